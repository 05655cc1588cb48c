"""parallelType pptp: the base handler with pipeline stages that are each tensor-parallel."""
from __future__ import annotations

from .base import LLMHandler


class PipelineTensorParallelHandler(LLMHandler):
    """pp_size stages x tp_size ranks each; TorchServe sends every batch to every rank (unlike pp)."""

    parallel_type = "pptp"
    engine_name = "pptp"

    def load_model(self):
        from ..engines import pptp as engine

        return engine.load(self.config, self.layout, self.ranks, self.model_path, self.device, self.dtype,
                           self.log_progress)
