"""parallelType pptp: the base handler with pipeline stages that are each tensor-parallel."""
from __future__ import annotations

from .base import ConfigError, LLMHandler


class PipelineTensorParallelHandler(LLMHandler):
    """pp_size stages x tp_size ranks each; TorchServe sends every batch to every rank (unlike pp)."""

    def check_layout(self) -> None:
        super().check_layout()
        if self.layout.parallel_type != "pptp":
            raise ConfigError(f"the pptp handler serves parallelType pptp, not {self.layout.parallel_type or 'none'}")

    def load_model(self):
        from ..engines import pptp as engine

        return engine.load(self.config, self.layout, self.ranks, self.model_path, self.device, self.dtype,
                           self.log_progress)
