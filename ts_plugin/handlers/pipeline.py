"""parallelType pp: the base handler with the pipeline engine (ts_plugin.engines.pipeline)."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from .base import LLMHandler

logger = logging.getLogger(__name__)


class PipelineHandler(LLMHandler):
    """Pipeline parallelism: each rank holds a stage. TorchServe sends PREDICT to rank 0 only, which runs the
    generation loop and drives the other ranks; they run a follower loop started at the end of `initialize`."""

    parallel_type = "pp"  # PREDICT reaches rank 0 only; it drives the other stages
    engine_name = "pipeline"

    def process_group_timeout(self) -> Optional[float]:
        pippy = self.config.pippy
        if pippy is not None and pippy.rpc_timeout is not None:
            return float(pippy.rpc_timeout)
        return super().process_group_timeout()

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        if self.ranks.is_driver:
            self._log_legacy_settings()
        else:
            self.model.start()
            self.log_progress("follower loop running; waiting for rank 0")

    def _log_legacy_settings(self) -> None:
        pippy = self.config.pippy
        if pippy is None:
            return
        if pippy.rpc_timeout is not None:
            logger.info("pippy.rpc_timeout %s s is used as the process-group timeout (there is no RPC)",
                        pippy.rpc_timeout)
        if pippy.num_worker_threads is not None:
            logger.info("pippy.num_worker_threads %s is accepted and ignored (stages talk point-to-point, "
                        "not over RPC)", pippy.num_worker_threads)
        if pippy.input_names != ["input_ids"]:
            logger.info("pippy.input_names %s accepted; stage 0 always takes input_ids, attention_mask and "
                        "position_ids", pippy.input_names)

    def load_model(self):
        from ..engines import pipeline as engine

        return engine.load(self.config, self.layout, self.ranks, self.model_path, self.device, self.dtype,
                           self.log_progress)

    def handle(self, data: List[Dict[str, Any]], context: Any) -> List[Any]:
        if not self.ranks.is_driver:
            raise RuntimeError(f"PREDICT reached pipeline rank {self.ranks.rank}; TorchServe sends pp predictions "
                               "to rank 0 only, which drives the other stages")
        return super().handle(data, context)

    def shutdown(self) -> None:
        """Stop the follower loops (rank 0 sends STOP down the pipeline)."""
        if self.initialized and self.ranks.is_driver:
            self.model.stop()
