"""parallelType tp: the base handler with the DeepSpeed engine."""
from __future__ import annotations

from .base import LLMHandler


class DeepSpeedHandler(LLMHandler):
    """Tensor parallelism with DeepSpeed inference: every rank gets every batch and computes its shard."""

    parallel_type = "tp"
    engine_name = "DeepSpeed"

    def load_model(self):
        from ..engines import deepspeed as engine

        return engine.load(self.config, self.layout, self.ranks, self.model_path, self.model_dir, self.device,
                           self.dtype, self.log_progress)
