"""The base handler every parallelType shares: config check at start, requests, batching, streaming, metrics,
rank roles and TorchServe's sync or async worker. One handler serves every parallelType: the engine is the one
the config's parallelType names (ts_plugin/config/parallel_types.py).

asyncCommunication (`parallelLevel` + `asyncCommunication: true`, parallelType custom): ts/async_service.py runs
an asyncio loop and does `ret = await handle(batch, context)`, so `handle` returns an awaitable. Requests arrive
without waiting for earlier answers, each batch with its own deep copy of the context (request_ids, response
status, headers). Every batch runs the ordinary synchronous generation in one dedicated thread, so batches run
one at a time, in arrival order, and the event loop keeps receiving requests meanwhile. TorchServe 0.12 quirks
worked around there (frontend AsyncBatchAggregator):
- `batchSize` must be 1: AsyncBatchAggregator.getRequest removes jobs from the map it is iterating, so the
  first time two requests are batched the frontend's worker thread dies (ConcurrentModificationException),
  the worker is restarted and those requests never get an answer. The validator refuses it (TSP211).
- a batch that ends in a message-level error (an exception escaping `handle`) is answered by failing EVERY
  request then in flight on the worker, not only that batch's. So in async mode nothing escapes: a failing
  batch answers each of its requests with its own status (503, or a PredictionException's code).
- streaming works: intermediate chunks carry `ts_stream_next: true` and the last one `false`. Chunks are
  written to the worker socket from the generation thread while TorchServe's response thread may write another
  batch's final answer; each is one small write of a whole message to a Unix stream socket, which the kernel
  does not interleave.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..config import ModelConfig, ParallelLayout, Report, ValidationContext, validate_data, validate_text
from ..config._loader import YamlSyntaxError, load_yaml
from ..config.parallel_types import PARALLEL_TYPES
from ..requests import Limits, RequestError, SamplingParams, TextRequest, check_lengths
from ..continuous import StepOutput, continuous_batch
from ..step_loop import LoopState, StepLoop, decision_group
from ..engines import Follower, Loaded, LoadContext
from ..engines.base import kv_bytes_per_token
from ..kv_blocks import BLOCK_SIZE, KVBlocks
from ..structured_output import Grammars
from ..engines import load as load_engine
from ._openai import (MODELS, TOKENIZER_ROUTES, OpenAIFormat, error_body, models_list, parse_openai,
                      tokenizer_answer)
from ._tgi import FORM_BODY, TGIFormat, parse_request

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """model-config.yaml fails the rules: the load fails with the validator's message."""


def check_worker_config(context: Any, model_dir: Path, gpus: Optional[int]) -> Report:
    """Run the validator at worker start on the config TorchServe parsed, with the line numbers of the archived
    model-config.yaml where the archive holds it."""
    name = ((getattr(context, "manifest", None) or {}).get("model") or {}).get("configFile")
    path = model_dir / name if name else None
    validation = ValidationContext(model_dir=model_dir, gpus=gpus)
    positions = None
    if path is not None and path.is_file():
        text = path.read_text(encoding="utf-8")
        try:
            positions = load_yaml(text)
        except YamlSyntaxError:  # TorchServe then serves with every default: report the file's own error
            return validate_text(text, name, validation)
    return validate_data(context.model_yaml_config or {}, name or "model-config.yaml", validation, positions)


def torch_dtype(name: Optional[str], device_type: str):
    """The configured dtype, or fp16 on GPU and fp32 on CPU."""
    import torch

    if name is None:
        return torch.float16 if device_type == "cuda" else torch.float32
    return getattr(torch, name)  # the schema stores the canonical name


class LLMHandler:
    """Serve a HuggingFace causal LM with the engine of the config's parallelType. Subclasses may override
    `preprocess` / `postprocess`.

    Request: `{"inputs": "...", "parameters": {...}, "stream": false}` or a plain-text prompt.
    Response: `{"generated_text": "...", "details": {"prompt_tokens", "completion_tokens", "finish_reason"}}`.
    OpenAI's bodies on its routes (handlers/_openai.py). With continuousBatching the running batch steps in a
    thread of its own (ts_plugin.step_loop) and every call collects its news, otherwise a batch is generated to its
    end.
    """

    def __init__(self):
        self.initialized = False
        self.context: Any = None  # TorchServe's context: set by initialize and by each batch
        self.config: Optional[ModelConfig] = None
        self.layout: Optional[ParallelLayout] = None
        self.deepspeed_file: Dict[str, Any] = {}  # the JSON deepspeed.config names, as validation read it
        self.model = None  # a StepModel where this rank runs generation
        self.follower = None  # a Follower where it serves another rank instead (pp stages 1..n-1)
        self.tokenizer = None
        self._batches = 0
        self._batch_lock = threading.Lock()
        self._executor: Optional[ThreadPoolExecutor] = None
        self.step_loop: Optional[StepLoop] = None  # continuousBatching: the live rows, stepped in their own thread
        self.kv: Optional[KVBlocks] = None  # the KV cache's blocks and prefix cache, where this rank generates
        self.kv_tokens: Optional[int] = None  # token slots the KV cache holds (handler.kv_cache_memory); None: no bound
        self._preemptions_seen = 0
        self._gauges_sent: Dict[str, float] = {}  # a gauge goes out when it changes: the frontend keeps the last value
        self._keepalive = _KeepAlive(None, [], 0, sends=False)  # the running static batch's (see _KeepAlive)
        self.grammars: Optional[Grammars] = None  # structured output: the tokenizer's side, checks and matchers
        self._live: Dict[str, _Live] = {}  # continuousBatching: the requests in the batch, by request id

    # --- start-up -------------------------------------------------------------------------------
    def initialize(self, context: Any) -> None:
        import torch

        from ..distributed import Ranks, bind_to_launcher, init_process_group, pick_device, watch_peers

        self.context = context
        loading_since = time.monotonic()
        self.model_dir = Path(context.system_properties.get("model_dir", "."))
        self.ranks = Ranks.from_env()
        # first: a rank orphaned by a torchrun restart must not load (see bind_to_launcher)
        bind_to_launcher(self.ranks)
        gpus = torch.cuda.device_count() if "CUDA_VISIBLE_DEVICES" not in os.environ else None
        report = check_worker_config(context, self.model_dir, gpus)
        for finding in report.findings:
            logger.warning("%s", finding.format(report.source))
        if not report.ok:
            raise ConfigError(f"model-config.yaml has {len(report.errors)} error(s):\n{report.text()}")
        self.config, self.layout, self.deepspeed_file = report.config, report.layout, report.deepspeed_file
        self.check_layout()
        self.device = pick_device(self.ranks, self.config.device_type)
        self.dtype = torch_dtype(self.config.handler.dtype, self.device.type)
        torch.manual_seed(self.config.handler.manual_seed)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.ranks = init_process_group(self.ranks, self.device, self.layout.process_group_timeout_s)
        self.model_path = self.resolve_model_path()
        self.log_progress(f"loading {self.model_path} on {self.device} as {self.dtype}")
        started = time.perf_counter()
        self.tokenizer = self.load_tokenizer()
        loaded = self.load_model()
        self.log_progress(f"model ready in {time.perf_counter() - started:.1f}s")
        if self.ranks.world_size > 1 and time.monotonic() - loading_since > self.config.startup_timeout:
            # WorkerThread polls one LOAD reply per rank, each for startupTimeout, and keeps the last: a late
            # rank's reply stays queued and answers the next request, and every later answer is one request late
            logger.error("[rank %d] loading took %.0f s, longer than startupTimeout (%d s): TorchServe 0.12 may "
                         "now pair this worker's replies with the wrong requests. Raise startupTimeout.",
                         self.ranks.rank, time.monotonic() - loading_since, self.config.startup_timeout)
        # a rank silent for longer than the frontend waits for a reply restarts the worker, idle or not
        watch_peers(self.ranks, self.config.response_timeout)
        if isinstance(loaded, Follower):
            self.follower = loaded
            self.follower.start()
            self.log_progress("follower loop running; waiting for rank 0")
        else:
            self.model = loaded
        if self.asynchronous:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ts_plugin-generate")
            self.log_progress(f"asyncCommunication: handle is awaitable, batches run one at a time "
                              f"(parallelLevel {self.config.parallel_level or 1})")
        self.limits = Limits(self.config.handler.max_new_tokens, self.config.handler.max_request_bytes)
        self.max_positions = self.model_max_positions()
        self.eos_token_ids = self.eos_ids()
        self.grammars = Grammars(self.tokenizer, max(getattr(self.hf_config(), "vocab_size", 0) or 0,
                                                     len(self.tokenizer)), self.eos_token_ids,
                                 compact_json=self.config.handler.disable_any_whitespace)
        if self.model is not None:
            try:  # every rank that parses requests checks grammars against it
                self.grammars.build_token_table()
            except Exception as error:  # noqa: BLE001 - only structured requests need it: they get the error
                logger.warning("structured output will fail: llguidance cannot read this tokenizer (%s: %s)",
                               type(error).__name__, error)
            handler = self.config.handler
            if handler.kv_cache_memory is not None:
                self._bound_kv_cache(handler.kv_cache_memory)
            # no bound: room for batchSize requests of the longest length (the pool grows only as it is used)
            tokens = self.kv_tokens or max(self.config.batch_size, 1) * (handler.max_length or self.max_positions
                                                                         or 1 << 16)
            self.kv = KVBlocks(-(-tokens // BLOCK_SIZE), cached_blocks=handler.prefix_cache_tokens // BLOCK_SIZE
                               if handler.enable_prefix_caching else 0)
        if self.config.continuous_batching:
            self._start_step_loop()
        self.initialized = True

    def _bound_kv_cache(self, memory) -> None:
        try:
            # on the rank that holds the most of them (the pp stage of the most layers)
            per_token = kv_bytes_per_token(self.hf_config(), self.dtype, self.layout.tp_size, self.model.kv_layers)
        except (AttributeError, TypeError) as error:  # a config without the usual head and layer counts
            logger.warning("handler.kv_cache_memory is not applied: the KV size of a token of this model is "
                           "unknown (%s)", error)
            return
        # whole blocks, so that a request the handler admits always fits the blocks
        self.kv_tokens = memory // per_token // BLOCK_SIZE * BLOCK_SIZE
        if self.kv_tokens < BLOCK_SIZE:
            raise ConfigError(f"handler.kv_cache_memory {memory.human_readable()} holds no block of {BLOCK_SIZE} "
                              f"tokens of this model ({per_token} bytes a token on a rank): give it at least "
                              f"{per_token * BLOCK_SIZE} bytes")
        self.log_progress(f"KV cache: {memory.human_readable()} per rank, {self.kv_tokens} tokens in blocks of "
                          f"{BLOCK_SIZE}, allocated as they are used")

    def check_layout(self) -> None:
        """Compare the derived layout with what torchrun actually started."""
        if not self.layout.parallel_type:
            raise ConfigError(f"model-config.yaml sets no parallelType; ts_plugin's handler serves one of "
                              f"{', '.join(PARALLEL_TYPES)}: add `parallelType: ...` with the one to use")
        if self.layout.uses_torchrun and self.layout.world_size != self.ranks.world_size:
            raise ConfigError(f"the config asks for {self.layout.world_size} ranks but torchrun started "
                              f"{self.ranks.world_size} (WORLD_SIZE)")

    def log_progress(self, message: str) -> None:
        logger.info("[rank %d/%d] %s", self.ranks.rank, self.ranks.world_size, message)

    def resolve_model_path(self) -> Path:
        configured = self.config.handler.model_path
        if not configured:
            return self.model_dir
        path = Path(configured)
        return path if path.is_absolute() else self.model_dir / path

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.model_path),
                                                  trust_remote_code=self.config.handler.trust_remote_code)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def load_model(self) -> Loaded:
        """This rank's StepModel (or Follower), from the engine of the config's parallelType."""
        context = LoadContext(self.config, self.layout, self.ranks, self.model_path, self.model_dir, self.device,
                              self.dtype, self.log_progress, self.deepspeed_file)
        return load_engine(context)

    def _start_step_loop(self) -> None:
        """Where this rank generates, the live rows and their loop. Where every rank generates (tp, pptp), rank 0's
        loop decides each step for all (ts_plugin.step_loop); every rank takes part in finding that out, the pp
        stages that only serve rank 0 included."""
        from ..distributed import any_rank_failed

        group = None
        if self.ranks.world_size > 1 and not any_rank_failed(self.model is None):  # i.e. every rank generates
            group = decision_group()
        if self.model is None:
            return
        live = continuous_batch(self.model, self.tokenizer, self.eos_token_ids, self.config.handler.manual_seed,
                                self.config.batch_size, self.kv, self.config.handler.max_num_batched_tokens,
                                self.grammars)
        self.step_loop = StepLoop(live, self.config.handler.steps_per_call, group)
        self.log_progress(f"continuousBatching: requests join and leave the running batch at every step "
                          f"({live.groups} group(s) of rows, stepped in a thread of their own)")

    @property
    def asynchronous(self) -> bool:
        return bool(self.config is not None and self.config.async_communication)

    def model_max_positions(self) -> Optional[int]:
        config = self.hf_config()
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(getattr(config, name, None), int):
                return getattr(config, name)
        return None

    def eos_ids(self) -> List[int]:
        """End-of-sequence ids as HF generate sees them (generation_config first)."""
        from transformers import GenerationConfig

        try:
            value = GenerationConfig.from_pretrained(str(self.model_path)).eos_token_id
        except OSError:
            value = None
        for fallback in (self.hf_config().eos_token_id, self.tokenizer.eos_token_id):
            value = fallback if value is None else value
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def hf_config(self):
        from transformers import AutoConfig

        if getattr(self, "_hf_config", None) is None:
            self._hf_config = AutoConfig.from_pretrained(str(self.model_path),
                                                         trust_remote_code=self.config.handler.trust_remote_code)
        return self._hf_config

    # --- requests -------------------------------------------------------------------------------
    def preprocess(self, data: List[Dict[str, Any]],
                   routes: Optional[List[str]] = None) -> List[Union[TextRequest, RequestError]]:
        """Parse each row (TGI on the plain route, OpenAI's on theirs); a bad row becomes a RequestError (the same
        on every rank). Whatever a row's body makes parsing raise stays that row's answer: an exception escaping
        here would make TorchServe fail every request of the batch, and every running one with it."""
        parsed: List[Union[TextRequest, RequestError]] = []
        for row, route in zip(data, routes or [""] * len(data)):
            try:
                request = (parse_request(row, self.limits) if not route else
                           parse_openai(row, route, self.limits, self.tokenizer, self.config.handler.chat_template,
                                        self.served_model_names(), self.config.handler.tool_call_parser))
                request.input_ids = self.tokenizer(request.prompt,
                                                   add_special_tokens=request.add_special_tokens)["input_ids"]
                check_lengths(len(request.input_ids), request.params, self.config.handler.max_length, self.max_positions,
                              self.kv_tokens)
                if request.params.grammar is not None:
                    self.grammars.check(request.params.grammar)
                parsed.append(request)
            except RequestError as error:
                parsed.append(error)
            except Exception as error:  # noqa: BLE001 - the same bytes raise the same on every rank
                logger.warning("a request body could not be read", exc_info=True)
                parsed.append(RequestError(f"the request could not be read ({type(error).__name__}: {error})"))
        return parsed

    def inference(self, requests: List[TextRequest], on_step=None):
        from ..continuous import generate

        seed = self.config.handler.manual_seed + self._batches
        return generate(self.model, self.tokenizer, [r.input_ids for r in requests], [r.params for r in requests],
                        seed, self.eos_token_ids, on_step, self.config.handler.max_num_batched_tokens, self.kv,
                        self.grammars, self._keepalive.beat)

    def postprocess(self, request: TextRequest, result) -> Dict[str, Any]:
        return {"generated_text": result.text,
                "details": {"finish_reason": result.finish_reason, "generated_tokens": result.completion_tokens,
                            "seed": request.params.seed, "prompt_tokens": result.prompt_tokens,
                            "completion_tokens": result.completion_tokens}}

    def handle(self, data: List[Dict[str, Any]], context: Any):
        """A list of responses (sync worker), or an awaitable of it (asyncCommunication: true)."""
        if self.follower is not None:
            raise RuntimeError(f"PREDICT reached rank {self.ranks.rank}, which serves rank 0's messages; TorchServe "
                               "sends pp predictions to rank 0 only, which drives the other stages")
        if self.asynchronous:
            return self._handle_async(data, context)
        return self._handle_one_batch(data, context)

    def shutdown(self) -> None:
        """The worker stops: end the follower loops (rank 0 tells them), remove offloaded weights."""
        for part in (self.step_loop, self.model, self.follower):
            if part is not None:
                part.close()

    def _handle_one_batch(self, data: List[Dict[str, Any]], context: Any) -> List[Any]:
        from ..distributed import InStepError, leave_worker

        with self._batch_lock:  # the model and the batch counter serve one batch at a time
            try:
                if self.step_loop is not None:
                    return self._continuous_step(data, context)
                return self._generate_batch(data, context)
            except Exception as error:
                if self.ranks.world_size > 1 and not isinstance(error, InStepError):
                    leave_worker(self.ranks, error)
                raise

    def _continuous_step(self, data: List[Dict[str, Any]], context: Any) -> List[Any]:
        """One call of TorchServe's ContinuousBatching aggregator: the running requests (rows without a body: the
        frontend has them cached here) plus new ones. The new ones go to the step loop, and every request gets what
        the loop's steps gave it since the last call (the call waits for the step in flight if none gave anything);
        a request stays while its answer says `ts_stream_next: true` (context.stopping_criteria). Streaming
        requests get their JSON lines, the others an empty chunk (written as nothing) until their whole answer."""
        self.context = context
        request_ids = [context.request_ids[index] for index in range(len(data))]
        present = set(request_ids)
        cancelled = []
        for request_id in [request_id for request_id in self._live if request_id not in present]:
            cancelled += [row_id for row_id, _, _ in self._live.pop(request_id).rows]
            if self.step_loop.decides:  # elsewhere it may just have finished: only rank 0's answers pace the calls
                self.log_progress(f"request {request_id} left the batch (its client went away): cancelled")
        new = [i for i, request_id in enumerate(request_ids) if request_id not in self._live]
        responses: List[Any] = [""] * len(data)
        lost = [i for i in new if not data[i]]  # no body: the frontend thinks it is running here, or it was a form
        for index in lost:
            if "form-urlencoded" in (request_header(context, index, "content-type") or ""):
                error = RequestError(FORM_BODY, 400)
            else:
                error = RequestError("this request's state was lost when an earlier step failed; send it again", 500)
            context.set_response_status(error.status, str(error), index)
            responses[index] = {"error": str(error), "error_type": "validation" if error.status < 500 else "internal"}
        requests = self._parse(data, context, [i for i in new if data[i]], responses)
        done = [index in new and index not in requests for index in range(len(data))]
        joining = []
        for index, request in requests.items():
            live = _Live(request, self.response_format(request, request_ids[index]), request_ids[index])
            self._live[request_ids[index]] = live
            joining += live.rows
        try:
            outputs = self.step_loop.exchange(joining, cancelled)
        except BaseException:
            self._live.clear()  # the batch was reset: the frontend fails every running request with this call
            raise
        results = []
        for index, request_id in enumerate(request_ids):
            if done[index]:
                continue
            live = self._live[request_id]
            responses[index] = live.respond(outputs, results)
            done[index] = live.done
            if done[index]:
                del self._live[request_id]
            set_content_type(context, index, live.request)
        # None leaves ts_stream_next unset: an answer that is whole in its first reply must go out as a plain
        # response (the frontend never sends the HTTP head of a stream that ends in its first reply)
        first = set(new)
        verdicts = [None if index in first and done[index] else done[index] for index in range(len(data))]
        context.stopping_criteria = [lambda _answer, verdict=verdict: verdict for verdict in verdicts]
        self._record_metrics(context, results, self.step_loop.state)
        return responses

    async def _handle_async(self, data: List[Dict[str, Any]], context: Any) -> List[Any]:
        from ts.service import PredictionException

        if self._executor is None:  # handle called before initialize finished
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

    def _parse(self, data: List[Dict[str, Any]], context: Any, indexes: List[int],
               responses: List[Any]) -> Dict[int, TextRequest]:
        """Parse the rows at `indexes`: answer v1/models, the tokenizer's routes and bad rows in `responses` at once
        (with their status) and return the requests to generate, by index."""
        routes = [request_route(context, index) for index in indexes]
        answered_now = (MODELS,) + TOKENIZER_ROUTES
        to_parse = [(index, route) for index, route in zip(indexes, routes) if route not in answered_now]
        for index, route in zip(indexes, routes):
            try:
                if route == MODELS:
                    responses[index] = models_list(self.served_model_names()[0])
                elif route in TOKENIZER_ROUTES:
                    responses[index] = tokenizer_answer(
                        data[index], route, self.limits, self.tokenizer, self.config.handler.chat_template,
                        self.served_model_names(), self.config.handler.max_length or self.max_positions)
            except RequestError as error:
                context.set_response_status(error.status, str(error), index)
                responses[index] = error_body(error)
        rows, row_routes = [data[index] for index, _ in to_parse], [route for _, route in to_parse]
        # an override written as preprocess(self, data) keeps working for the TGI route
        parsed = self.preprocess(rows, row_routes) if any(row_routes) else self.preprocess(rows)
        requests = {}
        for (index, route), item in zip(to_parse, parsed):
            if isinstance(item, RequestError):
                context.set_response_status(item.status, str(item), index)
                responses[index] = error_body(item) if route else {"error": str(item), "error_type": "validation"}
            else:
                requests[index] = item
        return requests

    def served_model_names(self) -> List[str]:
        """The names OpenAI's routes answer to (the first is the one they report): handler.served_model_name,
        else TorchServe's model name and handler.model_name."""
        served = self.config.handler.served_model_name
        if served:
            return [served] if isinstance(served, str) else list(served)
        names = [getattr(self.context, "model_name", None) or "model", self.config.handler.model_name]
        return list(dict.fromkeys(name for name in names if name))

    def response_format(self, request: TextRequest, request_id: str):
        """How one request's answer and stream events are written: TGI's or OpenAI's."""
        if request.api == "tgi":
            return TGIFormat(request, self.postprocess, self.tokenizer.all_special_ids)
        return OpenAIFormat(request, request_id, self.served_model_names()[0], self.tokenizer)

    def _generate_batch(self, data: List[Dict[str, Any]], context: Any) -> List[Any]:
        self.context = context
        responses: List[Any] = [None] * len(data)
        requests = self._parse(data, context, list(range(len(data))), responses)
        self._batches += 1
        if not requests:
            return responses
        good = sorted(requests)
        lives = {}
        for index in good:
            request_id = context.request_ids.get(index, str(index))
            lives[index] = _Live(requests[index], self.response_format(requests[index], request_id), request_id)
            set_content_type(context, index, requests[index])
        # one row per choice: (index in the batch, choice, its request)
        rows = [(index, choice, lives[index]) for index in good for choice in range(requests[index].n)]
        streamer = None
        if any(requests[i].stream for i in good) and self.ranks.local_rank == 0:
            streamer = _Streamer(context, rows)
        self._keepalive = _KeepAlive(context, good, self.config.response_timeout / 4, self.ranks.local_rank == 0)
        with self._keepalive:
            results = self.inference([dataclasses.replace(live.request, params=live.rows[choice][2])
                                      for _, choice, live in rows], streamer)
        # a streamed row's last output (its last text and logprobs) goes out with the answer
        outputs = {live.rows[choice][0]: (streamer.last.get(row) if streamer else None) or StepOutput("", result)
                   for row, ((_, choice, live), result) in enumerate(zip(rows, results))}
        for index in good:
            responses[index] = lives[index].respond(outputs, [])
        self._record_metrics(context, results)
        return responses

    def _record_metrics(self, context, results, state: Optional[LoopState] = None) -> None:
        """vLLM's serving metrics through TorchServe's metrics API, under vLLM's names without its `vllm:` prefix
        (TorchServe's metric lines cannot carry a colon): token counters, the prefix cache's queries and hits (in
        tokens), per-request latency histograms, the rows running and waiting after the last step and, under
        continuous batching (`state`: the step loop's), the KV bound's use (0 to 1) and the preemptions."""
        from ts.metrics.metric_type_enum import MetricTypes

        metrics = getattr(context, "metrics", None)
        if metrics is None or self.ranks.rank != 0:
            return
        try:
            state = state or LoopState()
            gauges = {"num_requests_running": (state.running, "count"),
                      "num_requests_waiting": (state.waiting, "count")}
            if self.step_loop is not None and state.kv_bound:
                gauges["kv_cache_usage_perc"] = (round(state.kv_used / state.kv_bound, 3), "percent")
            # each metric line costs the frontend a parse and two log lines, at every call (a step apart)
            for name, (value, unit) in gauges.items():
                if self._gauges_sent.get(name) != value:
                    metrics.add_metric(name, value, unit, metric_type=MetricTypes.GAUGE)
                    self._gauges_sent[name] = value
            if self.step_loop is not None and state.preemptions > self._preemptions_seen:
                metrics.add_counter("num_preemptions", state.preemptions - self._preemptions_seen)
                self._preemptions_seen = state.preemptions
            for name, value in (("prompt_tokens", sum(r.prompt_tokens for r in results)),
                                ("generation_tokens", sum(r.completion_tokens for r in results)),
                                ("prefix_cache_queries", sum(r.prompt_tokens for r in results)),
                                ("prefix_cache_hits", sum(r.cached_tokens for r in results))):
                if results:
                    metrics.add_counter(name, value)
            for result in results:
                gaps = (result.seconds - result.time_to_first_token_s) / max(result.completion_tokens - 1, 1)
                for name, value in (("time_to_first_token_seconds", result.time_to_first_token_s),
                                    ("inter_token_latency_seconds", gaps),
                                    ("e2e_request_latency_seconds", result.seconds)):
                    metrics.add_metric(name, value, "seconds", metric_type=MetricTypes.HISTOGRAM)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            logger.warning("could not record metrics", exc_info=True)


def request_route(context: Any, index: int) -> str:
    """The path after /predictions/{model}/{version}/ ("" for the plain route), which TorchServe 0.12 passes as
    the request header url_path."""
    return (request_header(context, index, "url_path") or "").strip("/")


def request_header(context: Any, index: int, name: str) -> Optional[str]:
    """A request header of row `index` (any case), None where the context has none."""
    try:
        headers = context.get_all_request_header(index) or {}
    except (AttributeError, IndexError, KeyError, TypeError):  # a context without request headers
        return None
    return next((value for key, value in headers.items() if str(key).lower() == name.lower()), None)


def set_content_type(context: Any, index: int, request: TextRequest) -> None:
    if request.stream:
        kind = "text/event-stream"
    else:
        kind = "application/json"
    context.set_response_content_type(index, kind)


def choice_params(request: TextRequest) -> List[SamplingParams]:
    """The sampling parameters of each of a request's `n` choices (a row each): a seeded request's choices take
    consecutive seeds, so that they differ and each is reproducible."""
    if request.n == 1 or request.params.seed is None:
        return [request.params] * request.n
    return [dataclasses.replace(request.params, seed=request.params.seed + choice) for choice in range(request.n)]


class _Live:
    """A request being generated: its answer's format, its rows (row id, prompt ids, parameters: one per choice) and
    their results so far. A static batch and each call of a continuous one answer it through `respond`."""

    def __init__(self, request: TextRequest, answer: Any, request_id: str):
        self.request, self.answer = request, answer
        self.rows = [(request_id if request.n == 1 else f"{request_id}#{choice}", request.input_ids, params)
                     for choice, params in enumerate(choice_params(request))]
        self.results: Dict[int, Any] = {}

    @property
    def done(self) -> bool:
        return len(self.results) == self.request.n

    def respond(self, outputs: Dict[str, StepOutput], finished: List[Any]) -> Any:
        """This call's response from its rows' `outputs` (by row id; a row without one finished earlier): the
        stream's events, or the whole answer once every choice finished ("" before). Appends the results that
        came now to `finished`."""
        events = []
        for choice, (row_id, _, _) in enumerate(self.rows):
            output = outputs.get(row_id)
            if output is None:
                continue
            if output.result is not None:
                self.results[choice] = output.result
                finished.append(output.result)
            if self.request.stream:
                events.append(self.answer.event(output.text, output.result, output.logprobs, choice))
        if self.request.stream:
            return "".join(events)
        return self.answer.whole([self.results[choice] for choice in range(self.request.n)]) if self.done else ""


#: one message at a time on the worker's socket: a static batch's streamer and its keep-alive write from two threads
_SENDING = threading.Lock()


class _KeepAlive:
    """Keeps a static batch that outlasts responseTimeout alive: TorchServe's WorkerThread waits responseTimeout for
    each message of the worker, not for the whole answer, so each of the batch's requests (`indexes`) gets an
    empty intermediate response every `interval_s` in which the batch made progress (a step ended: `beat`). A
    hung step stops them, and the frontend's timeout still ends a worker that hangs. An answer that got one goes
    out as a chunked response (the empty chunks are written as nothing), so its status can no longer change: that
    is the price of a batch longer than responseTimeout. `sends`: False on ranks whose messages the frontend does
    not read."""

    def __init__(self, context: Any, indexes: List[int], interval_s: float, sends: bool = True):
        self.context, self.indexes, self.interval_s = context, indexes, interval_s
        self._stop = threading.Event()
        self._progress = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ts_plugin-keepalive", daemon=True) if sends else None

    def beat(self) -> None:
        """A step ended."""
        self._progress.set()

    def __enter__(self) -> "_KeepAlive":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        from ts.handler_utils.utils import send_intermediate_predict_response

        chunks = [""] * (max(self.context.request_ids) + 1)
        ids = {index: self.context.request_ids[index] for index in self.indexes}
        while not self._stop.wait(self.interval_s):
            if not self._progress.is_set():
                continue
            self._progress.clear()
            with _SENDING:
                if self._stop.is_set():
                    return
                send_intermediate_predict_response(chunks, ids, "Intermediate Prediction success", 200, self.context)


class _Streamer:
    """Sends each streaming request's new text as a TorchServe intermediate response (rank 0 only)."""

    def __init__(self, context: Any, rows: List[Tuple[int, int, _Live]]):
        self.context = context
        self.rows = rows  # (index in the batch, choice, its request)
        self.last: Dict[int, Any] = {}  # row -> its last StepOutput, which goes out with handle's return value

    def __call__(self, row: int, output: Any) -> None:
        index, choice, live = self.rows[row]
        if not live.request.stream:
            return
        if output.result is not None:
            self.last[row] = output
            return
        from ts.handler_utils.utils import send_intermediate_predict_response

        chunks: List[Any] = [None] * (max(self.context.request_ids) + 1)
        chunks[index] = live.answer.event(output.text, None, output.logprobs, choice)
        with _SENDING:
            send_intermediate_predict_response(chunks, {index: self.context.request_ids[index]},
                                               "Intermediate Prediction success", 200, self.context)

