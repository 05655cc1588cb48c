"""parallelType pp: a HuggingFace causal LM split into pipeline stages, one per rank.

Rank 0 is the driver: TorchServe sends PREDICT to rank 0 only, so rank 0 runs the shared step loop
(`ts_plugin.continuous`) with `PipelineDriver` as its `StepModel`. Each step runs stage 0 locally,
sends the hidden states down the pipeline with point-to-point sends and receives the last position's
logits back from the last stage, so sampling happens on rank 0. The other ranks run
`PipelineFollower.run` in a background thread: block in a receive, run their stage, pass the result on.

Why not torch.distributed.pipelining's schedules (`pipeline()` + `build_stage` + `ScheduleGPipe`)?
They give correct logits for Llama and GPT-2, but a stage fixes its tensor shapes at the first step:
the next call with another batch size or prompt length fails inside the process group ("Received data
size doesn't match"), for traced and for manual `PipelineStage`s alike. Serving changes shapes on every
request and every decode step, and a schedule has no notion of a per-stage KV cache either. Its
splitter (`pipeline()`, torch.export tracing) worked only once per process here and would trace the
model without its cache. So the split is done at module boundaries on a meta-device copy of the model
(the same boundaries `pipe_split`/`SplitPoint.BEGINNING` would mark), and each transfer carries a small
header first (op code, shapes, dtype), then the payload: every shape works without re-splitting.

Each stage runs the model's own forward (the full `...ForCausalLM.forward`): the causal mask, rotary
or learned position embeddings and the layer calling convention are the model's own code for every
architecture. Layers of other stages are replaced by pass-through modules; a forward pre-hook on the
stage's first layer injects the hidden states received from the previous stage, and a forward hook on
its last layer ends the forward early on all but the last stage. Every stage keeps the keys and values of its own
layers in a paged pool (engines/_paged.py); each FORWARD carries the step's rows (their block tables, lengths and
new tokens) beside the hidden states, so a stage writes and reads the same blocks as rank 0 decided, and a decode
step moves one hidden state per row through the pipeline. Rows join and leave, and share prefix blocks, by their
block tables alone: there are no cache edits to send.

`pippy.chunks` splits a batch into groups of rows that are generated concurrently, each group's steps
following the others' through the stages (see `PipelineDriver`).
"""
from __future__ import annotations

import datetime
import functools
import itertools
import logging
import threading
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..distributed import InStepError, Ranks
from ..kv_blocks import BLOCK_SIZE
from ._onednn_head import use_onednn_head
from ._checkpoint import StageInfo, build_meta_model, materialize_stage, peak_rss_mb
from ._cpu_kernels import use_small_batch_linears
from ._paged import NO_MASK, KVPool, PagedBatch, use_paged_attention
from .base import EngineError, Follower, LoadContext, StepModel, logits_to_keep, raise_if_any_rank_failed, rows_logits

logger = logging.getLogger(__name__)

#: where decoder-only HF models keep their list of decoder layers (checked first, in this order)
LAYER_LISTS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "transformer.layers",
               "transformer.blocks", "model.language_model.layers", "decoder.layers", "layers", "h")

# message op codes (header[0])
FORWARD, STOP, ERROR, RESULT = range(1, 5)
HEADER = 7  # [op, step number, tokens, ints, rows, dtype code, hidden/vocab size]
# FORWARD's payload: the step's rows as ints (PagedBatch.to_ints), then the hidden states [1, tokens, hidden];
# RESULT's: the logits of each row's last token [rows, vocab]
DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
#: headers wait on a gloo group of their own with this timeout: an idle follower blocks in a receive for as
#: long as the server has no requests, and gloo ends a receive that outlives the group's timeout
IDLE_TIMEOUT = datetime.timedelta(days=365)


class PipelineError(EngineError):
    """The pipeline engine cannot serve this model with this config; the message says what to change."""


# --- splitting -------------------------------------------------------------------------------------------------

def find_layer_list(model: torch.nn.Module) -> Tuple[str, torch.nn.ModuleList]:
    """The decoder layer list: a known attribute path, else the one ModuleList of num_hidden_layers blocks."""
    modules = dict(model.named_modules())
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    expected = getattr(text_config, "num_hidden_layers", None)
    for path in LAYER_LISTS:
        found = modules.get(path)
        if isinstance(found, torch.nn.ModuleList) and len(found) and (expected is None or len(found) == expected):
            return path, found
    candidates = [(name, module) for name, module in modules.items()
                  if isinstance(module, torch.nn.ModuleList) and expected and len(module) == expected
                  and len({type(child) for child in module}) == 1]
    if len(candidates) == 1:
        return candidates[0]
    raise PipelineError(
        f"parallelType pp cannot split {type(model).__name__}: no single list of decoder layers was found "
        f"(looked for {', '.join(LAYER_LISTS[:5])}, ... and for one ModuleList of num_hidden_layers={expected} "
        f"blocks; found {[name for name, _ in candidates] or 'none'}). Serve it with parallelType tp or custom.")


def decode_costs(model: torch.nn.Module, layers: torch.nn.ModuleList) -> Tuple[List[int], int]:
    """What each decoder layer and the LM head cost a decode step, in bytes of weights: a decode step reads every
    weight once, and a layer's norms, rotary embeddings, attention and residual adds cost about what its linears
    do (SmolLM2, 4 rows, one CPU thread: 2.2 ms a layer, 1.0 of it in linears; its 576 x 49,152 head 9.3 ms), so a
    layer counts twice its weights and the head once. The input embedding is a lookup and counts nothing."""
    head = model.get_output_embeddings()
    head_bytes = sum(p.numel() * p.element_size() for p in head.parameters()) if head is not None else 0
    return [2 * sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers], head_bytes


def stage_bounds(layer_costs: Sequence[int], stages: int, layers_path: str,
                 split_points: Optional[Sequence[str]] = None, head_cost: int = 0) -> List[Tuple[int, int]]:
    """[start, end) layer ranges per stage: beginning at `split_points` (module names) where given, else the split
    whose slowest stage costs least, the last stage holding the head (`head_cost`); of equal splits, the one with
    the larger earlier stages. A pipeline steps at its slowest stage's pace, so an even split by layers would leave
    the other stages waiting for the one with the LM head."""
    num_layers = len(layer_costs)
    if stages > num_layers:
        raise PipelineError(f"{stages} pipeline stages but the model has only {num_layers} decoder layers; "
                            "use at most as many ranks as layers")
    if not split_points:
        starts = _balanced_starts(layer_costs, stages, head_cost)
    else:
        if len(split_points) != stages - 1:
            raise PipelineError(f"pippy.split_points has {len(split_points)} entries; {stages} stages need "
                                f"{stages - 1} (the module names where stages 1..{stages - 1} begin)")
        starts = [0]
        for point in split_points:
            prefix, _, index = point.rpartition(".")
            if prefix != layers_path or not index.isdigit():
                raise PipelineError(f"pippy.split_points entry {point!r} is not a decoder layer of this model; "
                                    f"use {layers_path}.<i> with 0 < i < {num_layers}")
            starts.append(int(index))
        if any(not 0 < start < num_layers for start in starts[1:]) or starts != sorted(set(starts)):
            raise PipelineError(f"pippy.split_points {list(split_points)} must be increasing layer names between "
                                f"{layers_path}.1 and {layers_path}.{num_layers - 1}")
    ends = starts[1:] + [num_layers]
    return list(zip(starts, ends))


def _balanced_starts(costs: Sequence[int], stages: int, head_cost: int) -> List[int]:
    n = len(costs)
    prefix = list(itertools.accumulate(costs, initial=0))

    @functools.lru_cache(maxsize=None)
    def best(start: int, left: int) -> Tuple[int, int]:
        """(the least slowest-stage cost of layers start.. in `left` stages, where the first of them ends); of
        equal costs, the largest first stage."""
        if left == 1:
            return prefix[n] - prefix[start] + head_cost, n
        cost, negative_end = min((max(prefix[end] - prefix[start], best(end, left - 1)[0]), -end)
                                 for end in range(start + 1, n - left + 2))
        return cost, -negative_end

    starts = [0]
    for left in range(stages, 1, -1):
        starts.append(best(starts[-1], left)[1])
    return starts


def split_stages(model: torch.nn.Module, stages: int,
                 split_points: Optional[Sequence[str]] = None) -> Tuple[str, List[Tuple[int, int]]]:
    """The decoder layer list's path and each stage's [start, end) layers (`stage_bounds` over `decode_costs`)."""
    layers_path, layers = find_layer_list(model)
    layer_costs, head_cost = decode_costs(model, layers)
    return layers_path, stage_bounds(layer_costs, stages, layers_path, split_points, head_cost)


class _StageOutput(Exception):
    """Raised by the hook on a non-last stage's last layer to end the model's forward there."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("stage output")
        self.hidden = hidden


# --- one stage ----------------------------------------------------------------------------------------------------

class PipelineStage:
    """Runs this rank's layers through the model's own forward (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, info: StageInfo, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.info = info
        self.device = device
        self.dtype = dtype
        self.pool = KVPool(BLOCK_SIZE)
        use_paged_attention(model)
        use_small_batch_linears(model)
        self._keep = logits_to_keep(model)
        self._inject: Optional[torch.Tensor] = None
        layers = model.get_submodule(info.layers_path)
        embeddings = model.get_input_embeddings()
        self.embedding_dim = getattr(embeddings, "embedding_dim", None) or model.config.get_text_config().hidden_size
        if not info.is_first:
            layers[info.start].register_forward_pre_hook(self._inject_hidden, with_kwargs=True)
        if not info.is_last:
            layers[info.end - 1].register_forward_hook(self._stop_after)

    def _inject_hidden(self, module, args, kwargs):
        # what the model computed before this layer (embedding of a placeholder, position embeddings, the
        # pass-through layers) is replaced by the previous stage's output
        if args:
            return (self._inject, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._inject}

    @staticmethod
    def _stop_after(module, args, output):
        raise _StageOutput(output[0] if isinstance(output, (tuple, list)) else output)

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """First stage: `inputs` are the step's token ids `[tokens]`; later stages: the previous stage's hidden
        states `[1, tokens, hidden]`. Returns this stage's hidden states, or on the last stage each row's last
        token's logits `[rows, vocab]` (float32)."""
        kwargs = dict(position_ids=batch.position_ids.to(self.device), attention_mask=NO_MASK.to(self.device),
                      use_cache=False, paged=batch, **self._keep(batch))
        if self.info.is_first:
            kwargs["input_ids"] = inputs.view(1, -1).to(self.device)
        else:
            self._inject = inputs.to(self.device)
            kwargs["inputs_embeds"] = torch.zeros(1, inputs.shape[1], self.embedding_dim, dtype=inputs.dtype,
                                                  device=self.device)
        try:
            out = self.model(**kwargs)
        except _StageOutput as done:
            return done.hidden
        finally:
            self._inject = None
        return rows_logits(out.logits, batch)


# --- transport ------------------------------------------------------------------------------------------------------

class _Link:
    """Point-to-point messages between stages: a header on a gloo group (CPU, long timeout), then the
    payload on the default group (gloo on CPU, nccl on GPU). Sends are serialized: a header and its payload
    must reach the next stage without another thread's message in between."""

    def __init__(self, control, device: torch.device):
        self.control = control
        self.device = device
        self.pending: List[Any] = []  # in-flight isends (their tensors stay referenced until done)
        self._lock = threading.Lock()

    def send(self, dst: int, header: Sequence[int], *payload: torch.Tensor) -> None:
        head = torch.tensor(list(header) + [0] * (HEADER - len(header)), dtype=torch.int64)
        with self._lock:
            self.pending.append((dist.isend(head, dst, group=self.control), head))
            for tensor in payload:
                tensor = tensor.contiguous().to(self.device)
                self.pending.append((dist.isend(tensor, dst), tensor))
            self.pending = [(work, tensor) for work, tensor in self.pending if not work.is_completed()]

    def recv_header(self, src: int) -> List[int]:
        head = torch.empty(HEADER, dtype=torch.int64)
        dist.recv(head, src, group=self.control)
        return head.tolist()

    def recv(self, src: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        dist.recv(tensor, src)
        return tensor

    def flush(self) -> None:
        with self._lock:
            for work, _ in self.pending:
                work.wait()
            self.pending = []


class PipelineDriver(StepModel):
    """Rank 0's StepModel: stage 0 here, the other stages on ranks 1..n-1, logits back from the last.

    A batch is split into `row_groups`: `pippy.chunks` groups of rows, at most one per stage, and the step
    loop (`ts_plugin.continuous.ContinuousGroups`) steps each group in a thread of its own. While stage 1 runs one group's step,
    stage 0 runs another group's, across decode steps, so every stage stays busy; a schedule that overlaps
    micro-batches within one step drains the pipeline at every token, since the next step needs this step's
    token. More groups than stages cannot all be in flight: they would only make every stage read its weights
    once more per token, which is what a decode step costs on a memory-bound device.
    On CPU, where the stages share one memory system and its cores, even one group per stage reads the weights more
    often than the overlap pays for: one group with every core a stage's is faster there (rule TSP227).

    The group threads take turns on stage 0 (a lock). Every stage works first in, first out, so results come
    back in the order the hidden states were sent, and each thread receives in its turn.
    """

    samples_here = True

    def __init__(self, stage: PipelineStage, ranks: Ranks, chunks: int, link: Optional[_Link]):
        self.stage = stage
        self.ranks = ranks
        self.chunks = max(1, chunks)
        self.link = link
        self._stage_lock = threading.Lock()
        self._turns = threading.Condition()
        self._sent = 0  # hidden states sent down the pipeline, numbered in order
        self._received = 0  # results taken back
        self.pool = stage.pool
        self.kv_layers = stage.info.most_layers

    @property
    def world(self) -> int:
        return self.ranks.world_size

    def row_groups(self, rows: int) -> List[range]:
        """Contiguous row ranges generated concurrently: min(chunks, stages, rows) groups, sizes within one."""
        count = max(1, min(self.chunks, self.world, rows))
        base, extra = divmod(rows, count)
        starts = list(itertools.accumulate((base + (group < extra) for group in range(count)), initial=0))
        logger.info("[rank 0] pipeline: %d sequence(s) in %d group(s) of rows, interleaved through %d stage(s)",
                    rows, count, self.world)
        return [range(start, end) for start, end in zip(starts, starts[1:])]

    def forward(self, input_ids, batch):
        if self.stage.device.type == "cuda":
            torch.cuda.set_device(self.stage.device)  # the current device is per thread (generate's group threads)
        with self._stage_lock:
            try:
                out = self.stage.run(input_ids, batch)
            except Exception as error:  # before this step reached any other stage
                raise InStepError(f"pipeline stage 0 failed: {type(error).__name__}: {error}") from error
            if self.world == 1:
                return out
            ticket = self._sent
            ints = batch.to_ints()
            self.link.send(1, [FORWARD, ticket, batch.tokens, ints.numel(), len(batch.rows), DTYPE_CODES[out.dtype],
                               out.shape[-1]], ints, out)
            self._sent += 1
        return self._receive(ticket)

    def _receive(self, ticket: int) -> torch.Tensor:
        last = self.world - 1
        with self._turns:
            self._turns.wait_for(lambda: self._received == ticket)
        try:
            op, got, rows, _, _, _, vocab = self.link.recv_header(last)
            logits = self.link.recv(last, (rows, vocab), torch.float32).cpu() if op == RESULT else None
        finally:
            with self._turns:
                self._received += 1
                self._turns.notify_all()
        if got != ticket:
            raise RuntimeError(f"pipeline out of step: rank 0 expected the result of step {ticket}, got {got}")
        if logits is None:  # the failing stage passed the failure down the pipeline: every stage is in step
            raise InStepError(f"pipeline stage failed on step {ticket}; see the model log of ranks 1..{last}")
        return logits

    def share_tokens(self, tokens):
        return tokens  # only rank 0 runs the loop

    def close(self) -> None:
        """Tell the followers to leave their loops (the worker is shutting down)."""
        with self._stage_lock:
            if self.world > 1 and self.link is not None:
                self.link.send(1, [STOP])
                self.link.flush()
                self.link = None


class PipelineFollower(Follower):
    """Ranks 1..n-1: receive, run the stage, pass on, until STOP or until the process group goes away."""

    def __init__(self, stage: PipelineStage, ranks: Ranks, link: _Link):
        self.stage = stage
        self.ranks = ranks
        self.link = link
        self.thread: Optional[threading.Thread] = None
        self.steps = 0
        self.ended_by: Optional[BaseException] = None  # what ended the loop, where not STOP

    @property
    def is_last(self) -> bool:
        return self.ranks.rank == self.ranks.world_size - 1

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=f"pp-follower-{self.ranks.rank}", daemon=True)
        self.thread.start()

    def wait(self) -> Optional[BaseException]:
        if self.thread is not None:
            self.thread.join()
        return self.ended_by

    def run(self) -> None:
        rank, prev, nxt = self.ranks.rank, self.ranks.rank - 1, self.ranks.rank + 1
        if self.stage.device.type == "cuda":
            torch.cuda.set_device(self.stage.device)  # the current device is per thread
        logger.info("[rank %d] pipeline follower loop started (stage %d, layers %d..%d)", rank,
                    self.stage.info.index, self.stage.info.start, self.stage.info.end - 1)
        try:
            while True:
                header = self.link.recv_header(prev)  # blocks (no polling) until the previous stage sends
                op, ticket, tokens, count, rows, dtype_code, hidden = header
                if op == STOP:
                    if not self.is_last:
                        self.link.send(nxt, header)
                    self.link.flush()
                    logger.info("[rank %d] pipeline follower loop stopped", rank)
                    return
                out = ints = None
                if op == FORWARD:
                    ints = self.link.recv(prev, (count,), torch.int64)
                    inputs = self.link.recv(prev, (1, tokens, hidden), DTYPES[dtype_code])
                    try:
                        out = self.stage.run(inputs, PagedBatch.from_ints(self.stage.pool, ints.cpu()))
                        self.steps += 1
                    except Exception:  # noqa: BLE001 - report downstream, stay in step
                        logger.exception("[rank %d] stage %d failed on step %d", rank, self.stage.info.index, ticket)
                        out = None
                if self.is_last:
                    if out is None:
                        self.link.send(0, [ERROR, ticket, rows])
                    else:
                        self.link.send(0, [RESULT, ticket, rows, 0, 0, 0, out.shape[-1]], out.float())
                elif out is None:
                    self.link.send(nxt, [ERROR, ticket, rows])
                else:
                    self.link.send(nxt, [FORWARD, ticket, tokens, count, rows, DTYPE_CODES[out.dtype], out.shape[-1]],
                                   ints, out)
        except Exception as error:  # noqa: BLE001 - the process group was destroyed or a peer exited
            self.ended_by = error
            logger.warning("[rank %d] pipeline follower loop ended: %s", rank, error)


# --- entry point ------------------------------------------------------------------------------------------------------

def load(context: LoadContext):
    """Build this rank's stage and return a PipelineDriver (rank 0) or a PipelineFollower (the others)."""
    config, ranks = context.config, context.ranks
    pippy = config.pippy
    stages = ranks.world_size
    # collective: every rank creates it, first thing, in the same order (its long timeout also covers ranks
    # that take a while to load their stage)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if stages > 1 else None
    failure: Optional[Exception] = None
    try:
        model = build_meta_model(context.model_path, context.dtype, config.handler.trust_remote_code)
        layers_path, bounds = split_stages(model, stages, pippy.split_points if pippy else None)
        before = peak_rss_mb()  # imports done, skeleton on meta: what follows is this stage's weights
        info = materialize_stage(model, ranks.rank, bounds, layers_path, context.model_path, context.device,
                                 context.dtype)
        if info.is_last and config.handler.onednn_lm_head:
            note = use_onednn_head(model)
            if note:
                context.progress(note)
        stage = PipelineStage(model, info, context.device, context.dtype)
    except Exception as error:  # noqa: BLE001 - agree with the other ranks first, then raise
        failure = error
    raise_if_any_rank_failed(failure, "its pipeline stage", control)  # e.g. a tensor missing from its checkpoint part
    context.progress(
        f"pipeline stage {info.index + 1}/{info.count} of {type(model).__name__}: {layers_path}.{info.start}"
        f"..{info.end - 1}{' + input embedding' if info.is_first else ''}{' + LM head' if info.is_last else ''}; "
        f"weights {info.stage_bytes / 2**20:.1f} MiB of the model's {info.model_bytes / 2**20:.1f} MiB "
        f"(model / world size = {info.model_bytes / stages / 2**20:.1f} MiB); peak RSS {peak_rss_mb():.0f} MiB, "
        f"{peak_rss_mb() - before:+.0f} MiB over the {before:.0f} MiB before reading weights")
    link = _Link(control, context.device) if control is not None else None
    if ranks.rank != 0:
        return PipelineFollower(stage, ranks, link)
    _log_legacy_settings(pippy)
    return PipelineDriver(stage, ranks, pippy.chunks if pippy else 1, link)


def _log_legacy_settings(pippy) -> None:
    if pippy is None:
        return
    if pippy.rpc_timeout is not None:
        logger.info("pippy.rpc_timeout %s s is used as the process-group timeout (there is no RPC)",
                    pippy.rpc_timeout)
    if pippy.num_worker_threads is not None:
        logger.info("pippy.num_worker_threads %s is accepted and ignored (stages talk point-to-point, "
                    "not over RPC)", pippy.num_worker_threads)
    if pippy.input_names != ["input_ids"]:
        logger.info("pippy.input_names %s accepted; stage 0 always takes input_ids and position_ids", pippy.input_names)
