"""parallelType custom: the base handler with the Accelerate engine, in TorchServe's sync or async worker.

TorchServe 0.12 starts ONE process for `parallelType: custom`:
- plain (no parallelLevel): an ordinary worker; it sees the host's GPUs and `handle` is called synchronously.
- asynchronous (`parallelLevel: N` + `asyncCommunication: true`; without the latter the frontend never
  reaches READY): ts/async_service.py runs an asyncio loop and does `ret = await handle(batch, context)`,
  so `handle` must return an awaitable. Requests arrive without waiting for earlier answers, each batch
  with its own deep copy of the context (request_ids, response status, headers). Here every batch runs the
  ordinary synchronous generation in one dedicated thread, so batches run one at a time, in arrival order,
  and the event loop keeps receiving requests meanwhile.

Async-mode quirks of TorchServe 0.12 this handler works around (frontend AsyncBatchAggregator):
- `batchSize` must be 1: AsyncBatchAggregator.getRequest removes jobs from the map it is iterating, so the
  first time two requests are batched the frontend's worker thread dies (ConcurrentModificationException),
  the worker is restarted and those requests never get an answer. The validator refuses it (TSP211).
  Each request is then its own generation batch.
- a batch that ends in a message-level error (an exception escaping `handle`) is answered by failing EVERY
  request then in flight on the worker, not only that batch's. So in async mode nothing escapes: a failing
  batch answers each of its requests with its own status (503, or a PredictionException's code).
- streaming works: intermediate chunks carry `ts_stream_next: true` and the last one `false`, and the
  frontend keeps the job until then. Chunks are written to the worker socket from the generation thread
  while TorchServe's response thread may write another batch's final answer; each is one small write of a
  whole message to a Unix stream socket, which the kernel does not interleave.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

from .base import LLMHandler

logger = logging.getLogger(__name__)


class DeviceMapHandler(LLMHandler):
    """One process, the model spread over its GPUs, CPU and disk by an Accelerate device map."""

    parallel_type = "custom"
    engine_name = "Accelerate"

    def __init__(self):
        super().__init__()
        self.device_map: Optional[Dict[str, Any]] = None
        self._batch_lock = threading.Lock()
        self._executor: Optional[ThreadPoolExecutor] = None

    @property
    def asynchronous(self) -> bool:
        return bool(self.config is not None and self.config.async_communication)

    def load_model(self):
        from ..engines import accelerate as engine

        step = engine.load(self.config, self.model_path, self.model_dir, self.device, self.dtype, self.log_progress)
        self.device_map = dict(step.device_map)
        if self.asynchronous:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ts_plugin-generate")
            self.log_progress(f"asyncCommunication: handle is awaitable, batches run one at a time "
                              f"(parallelLevel {self.config.parallel_level or 1})")
        return step

    def handle(self, data: List[Dict[str, Any]], context: Any):
        """A list of responses (sync worker), or an awaitable of it (asyncCommunication: true)."""
        if self.asynchronous:
            return self._handle_async(data, context)
        return self._handle_one_batch(data, context)

    def _handle_one_batch(self, data: List[Dict[str, Any]], context: Any) -> List[Any]:
        with self._batch_lock:  # the model and the batch counter serve one batch at a time
            return super().handle(data, context)

    async def _handle_async(self, data: List[Dict[str, Any]], context: Any) -> List[Any]:
        from ts.service import PredictionException

        if self._executor is None:  # handle called before load_model finished
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ts_plugin-generate")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._handle_one_batch, data, context)
        except PredictionException as error:
            return self._fail_batch(data, context, error.error_code, error.message)
        except MemoryError:
            logger.error("out of memory in a batch", exc_info=True)
            return self._fail_batch(data, context, 507, "Out of resources")
        except Exception as error:  # noqa: BLE001 - see the module docstring: nothing may escape in async mode
            logger.error("batch failed", exc_info=True)
            return self._fail_batch(data, context, 503, f"Prediction failed: {type(error).__name__}")

    @staticmethod
    def _fail_batch(data: List[Any], context: Any, status: int, message: str) -> List[Any]:
        for index in range(len(data)):
            context.set_response_status(status, message, index)
        return [{"error": message, "error_type": "internal"} for _ in data]
