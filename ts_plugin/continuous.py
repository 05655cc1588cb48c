"""The one step loop: requests join and leave the running batch at every step, and long prompts are prefilled in
chunks within a token budget, in the same forward as the running rows' next tokens. Static and continuous batching
both run it.

TorchServe's ContinuousBatching aggregator (`continuousBatching: true`) calls the handler again and again, each
time with the requests still running plus new ones up to batchSize; the handler hands them to a thread that steps
the batch on its own (ts_plugin.step_loop). A static batch (`generate`) is the same loop with every request
joining at once, so its finished rows leave instead of stepping on with padding.

Each step, `ContinuousBatch` schedules and runs one flat forward, as vLLM's V1 scheduler does (no separate prefill
and decode phases): every running row's next token, then prompt tokens within `handler.max_num_batched_tokens`
(each running row counts one): the rest of a prompt being prefilled in chunks, then waiting requests in arrival
order. The KV cache is paged (ts_plugin.engines._paged: one pool per rank; ts_plugin.kv_blocks: the block tables,
owned here): a row joins by getting blocks and leaves by giving them back, nothing is padded or copied, and a
prompt that begins with registered blocks of an earlier one starts from them (prefix caching). When a running row
needs a block and none is left, the newest running row is preempted: its blocks go back and it waits first in
line to be recomputed (its prompt and tokens, mostly prefix hits on its own registered blocks). A request whose
prompt and max_new_tokens alone exceed the cache is refused.

Every engine keeps its own part of each block (a tp rank its heads, a pp stage its layers) and only follows the
block tables of each step, so the same code serves tp, pp, pptp and custom: on tp and pptp every rank gets the same
calls and takes the same decisions (they depend on the calls alone, never on timing); in pp rank 0 sends each
step's rows down the stages with the hidden states. Why not transformers' continuous_batching manager: it runs a
scheduler and cache of its own, sized for the whole model's heads in one process, and one seed for all requests,
where a seeded request here must give the same tokens alone or beside others; what is taken from it is the idea of
the model's own forward over a flat batch through a registered attention function (see engines/_paged.py).

Where the engine splits a batch into row groups (pp with `pippy.chunks`: at most one group per stage),
`ContinuousGroups` keeps one ContinuousBatch per group, all on one KVBlocks, and steps each in a thread of its own
that never waits for the others: while stage 1 runs one group's step, stage 0 runs another's, and a request joins
its group at that group's next step.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .engines._paged import PagedBatch, PagedRow
from .engines.base import StepModel
from .generation import SequenceResult, TokenLogprob, _Sequence, advance, new_sequence, next_tokens
from .kv_blocks import KVBlocks
from .structured_output import Grammars
from .requests import SamplingParams


@dataclass
class _Row:
    request_id: str
    seq: _Sequence
    started: float
    text: str = ""  # new text of this step, for streaming
    logprobs_sent: int = 0  # how many of seq.logprobs earlier steps gave out
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    table: List[int] = dataclasses.field(default_factory=list)  # its KV blocks, in order
    computed: int = 0  # its first tokens whose keys and values are in those blocks
    registered: int = 0  # its full blocks registered for prefix hits

    @property
    def length(self) -> int:
        return len(self.seq.prompt_ids) + len(self.seq.token_ids)

    @property
    def left(self) -> int:
        """Tokens to compute before it can take its next one (a decoding row: its last token)."""
        return self.length - self.computed

    @property
    def ids(self) -> List[int]:
        return self.seq.prompt_ids + self.seq.token_ids

    def tokens(self, start: int, end: int) -> List[int]:
        """Its tokens start..end-1 (prompt, then generated)."""
        prompt = self.seq.prompt_ids
        if end <= len(prompt):
            return prompt[start:end]
        generated = self.seq.token_ids[max(0, start - len(prompt)):end - len(prompt)]
        return (prompt[start:] if start < len(prompt) else []) + generated


#: the fewest prompt tokens a chunked prefill takes in a step, whatever the running rows leave of the budget
MIN_CHUNK = 16


@dataclass
class StepOutput:
    """What a step produced for one request: its new text (and its tokens' logprobs where asked), and its result
    once it finished."""

    text: str
    result: Optional[SequenceResult]
    logprobs: List[TokenLogprob] = dataclasses.field(default_factory=list)

    def then(self, later: "StepOutput") -> "StepOutput":
        """This output followed by a later step's."""
        return StepOutput(self.text + later.text, later.result, self.logprobs + later.logprobs)


def merge_outputs(merged: Dict[str, StepOutput], later: Dict[str, StepOutput]) -> None:
    """Add a later step's outputs to `merged`, per request (its text and logprobs appended, its result the later)."""
    for request_id, output in later.items():
        earlier = merged.get(request_id)
        merged[request_id] = output if earlier is None else earlier.then(output)


class ContinuousBatch:
    """The live requests of one worker, and the one step loop over them: every rank that runs generation keeps
    one and calls it identically (so every decision below is a function of the calls alone, never of timing).

    Example::

        batch = ContinuousBatch(step_model, tokenizer, eos_ids=[2], default_seed=42, kv=KVBlocks(256),
                                max_batched_tokens=256)
        out = batch.step([("req-1", prompt_ids, SamplingParams(max_new_tokens=16))])  # prefill, first token
        while not out["req-1"].result:
            out = batch.step([])  # one token per live row
    """

    groups = 1  # row groups stepped concurrently (ContinuousGroups has more)

    def __init__(self, model: StepModel, tokenizer: Any, eos_ids: Sequence[int], default_seed: int, kv: KVBlocks,
                 max_batched_tokens: Optional[int] = None, grammars: Optional[Grammars] = None,
                 kv_lock: Optional[threading.RLock] = None):
        self.model = model
        self.kv = kv
        model.pool.blocks = kv.blocks  # the pool grows as blocks are used, to this at most
        self._kv_lock = kv_lock or threading.RLock()  # row groups share the blocks
        self.grammars = grammars
        self.tokenizer = tokenizer
        self.eos = set(eos_ids)
        self.default_seed = default_seed
        self.max_batched_tokens = max_batched_tokens
        self.preemptions = 0
        self._joined = 0  # requests so far: an unseeded one samples with default_seed + this
        self.running: List[_Row] = []  # rows with blocks, in the order they started (preempted last first)
        self.waiting: List[_Row] = []  # in arrival order; a preempted row first

    def __contains__(self, request_id: str) -> bool:
        return any(row.request_id == request_id for row in self.running + self.waiting)

    def __len__(self) -> int:
        return len(self.running) + len(self.waiting)

    def load(self) -> Tuple[int, int]:
        """(rows running, counting those part-prefilled; rows waiting for their prefill), as vLLM counts them."""
        return len(self.running), len(self.waiting)

    def kv_usage(self) -> Tuple[int, Optional[int]]:
        """(KV token slots held by rows, the cache's size in token slots)."""
        return self.kv.used * self.kv.block_size, self.kv.blocks * self.kv.block_size

    def cancel(self, request_ids: Sequence[str]) -> None:
        """Drop these requests, waiting or running (their client went away); ids not here are ignored."""
        unwanted = set(request_ids)
        self.waiting = [row for row in self.waiting if row.request_id not in unwanted]
        for row in [row for row in self.running if row.request_id in unwanted]:
            self._release(row)

    def step(self, joining: Sequence[Tuple[str, List[int], SamplingParams]]) -> Dict[str, StepOutput]:
        """Schedule and run one forward: a token for every running row and prompt tokens within the budget; rows
        that finish leave. Returns the output of this step of every live request (an empty one while it waits or
        prefills)."""
        for row in self.running:
            row.text = ""
        started = time.perf_counter()
        capacity = self.kv.blocks * self.kv.block_size
        for request_id, prompt, params in joining:
            if len(prompt) + params.max_new_tokens > capacity:
                raise ValueError(f"request {request_id} needs {len(prompt) + params.max_new_tokens} KV slots; the "
                                 f"cache holds {capacity} (the handler refuses it before it gets here)")
        for request_id, prompt, params in joining:
            seq = new_sequence(prompt, params, self.default_seed + self._joined, self.grammars)
            self.waiting.append(_Row(request_id, seq, started))
            self._joined += 1
        try:
            scheduled = self._schedule()
            if scheduled:
                self._run(scheduled)
        except BaseException:
            self.reset()  # the blocks are out of step with the rows: every live request fails with this call
            raise
        outputs = {}
        now = time.perf_counter()
        for row in list(self.running):
            result = None
            if row.seq.finish_reason:
                seq = row.seq
                result = SequenceResult(seq.text, seq.token_ids, len(seq.prompt_ids), seq.finish_reason,
                                        (seq.first_token_at or row.started) - row.started, now - row.started,
                                        seq.logprobs if seq.params.logprobs is not None else None,
                                        row.cached_tokens, seq.end_logprob)
                self._release(row)
            new_logprobs = row.seq.logprobs[row.logprobs_sent:]
            row.logprobs_sent += len(new_logprobs)
            outputs[row.request_id] = StepOutput(row.text, result, new_logprobs)
        for row in self.waiting:
            outputs[row.request_id] = StepOutput("", None)
        return outputs

    def steps(self, joining: Sequence[Tuple[str, List[int], SamplingParams]], count: int,
              heartbeat: Optional[Callable[[], None]] = None) -> Dict[str, StepOutput]:
        """Up to `count` steps, the first with `joining`; fewer once a row finishes, since its slot is then free for
        a new request. Each request's output holds its text of all the steps. `heartbeat()` is called after each
        step."""
        heartbeat = heartbeat or (lambda: None)
        outputs = self.step(joining)
        heartbeat()
        for _ in range(count - 1):
            if not len(self) or any(output.result for output in outputs.values()):
                break
            merge_outputs(outputs, self.step([]))
            heartbeat()
        return outputs

    def reset(self) -> None:
        """Drop every request and give back its blocks."""
        for row in list(self.running):
            self._release(row)
        self.waiting = []

    def close(self) -> None:
        self.reset()

    # --- internals -------------------------------------------------------------------------------------------

    def _release(self, row: _Row) -> None:
        self.running.remove(row)
        with self._kv_lock:
            self.kv.free(row.table)
        row.table, row.computed = [], 0

    def _preempt(self, row: _Row) -> None:
        """Give back `row`'s blocks; it waits first in line and is recomputed (its prompt and tokens so far)."""
        self._release(row)
        self.waiting.insert(0, row)
        self.preemptions += 1

    def _grow(self, row: _Row, tokens: int) -> bool:
        """Blocks for `row` to hold `tokens` tokens, preempting the newest running rows for them; False where
        `row` itself was preempted."""
        while True:
            need = self.kv.blocks_for(tokens) - len(row.table)
            got = self.kv.allocate(need) if need > 0 else []
            if got is not None:
                row.table += got
                return True
            victim = self.running[-1]
            self._preempt(victim)
            if victim is row:
                return False

    def _schedule(self) -> List[Tuple[_Row, int]]:
        """This step's rows and how many new tokens each computes, within the token budget: every decoding row's
        next token; then waiting prompts that fit the budget whole, in arrival order; then the next chunk of the
        prompts being prefilled; and where none is, a first chunk of the first waiting prompt. The step's first
        chunk takes at least MIN_CHUNK tokens, so a long prompt makes progress beside any batch. A waiting request
        starts only while blocks last, and the first that finds none stops the others behind it."""
        budget = self.max_batched_tokens
        scheduled: List[Tuple[_Row, int]] = []

        def take(row: _Row, count: int) -> None:
            nonlocal budget
            scheduled.append((row, count))
            budget = None if budget is None else budget - count

        with self._kv_lock:
            for row in [row for row in self.running if row.left == 1]:
                if row in self.running and self._grow(row, row.computed + 1):
                    take(row, 1)
            blocked = False
            for row in list(self.waiting):
                if budget is not None and budget <= 0:
                    break
                self._start(row)
                if budget is not None and row.left > budget:
                    self._unstart(row)
                    continue
                if not self._grow_new(row, row.length):
                    blocked = True
                    break
                take(row, row.left)
            for row in [row for row in self.running if row.left > 1 and not any(row is r for r, _ in scheduled)]:
                count = self._chunk(row.left, budget, scheduled)
                if count and row in self.running and self._grow(row, row.computed + count):
                    take(row, count)
            if not blocked and self.waiting and not any(count > 1 and row.left > count for row, count in scheduled):
                row = self.waiting[0]
                self._start(row)
                count = self._chunk(row.left, budget, scheduled)
                if count and self._grow_new(row, row.computed + count):
                    take(row, count)
                else:
                    self._unstart(row)
        return [(row, count) for row, count in scheduled if row in self.running]

    def _start(self, row: _Row) -> None:
        """A waiting row takes the registered blocks its tokens begin with."""
        row.table = self.kv.match(row.ids) if self.kv.cached_limit else []
        row.computed = len(row.table) * self.kv.block_size

    def _unstart(self, row: _Row) -> None:
        self.kv.free(row.table)
        row.table, row.computed = [], 0

    def _grow_new(self, row: _Row, tokens: int) -> bool:
        """Blocks for a started waiting row to hold `tokens`, without preempting anyone: then it runs."""
        got = self.kv.allocate(self.kv.blocks_for(tokens) - len(row.table))
        if got is None:
            self._unstart(row)
            return False
        row.table += got
        if not row.seq.token_ids:  # a recomputed row's hit is not the prompt's
            row.cached_tokens = row.computed
        self.waiting.remove(row)
        self.running.append(row)
        return True

    def _chunk(self, left: int, budget: Optional[int], scheduled: List[Tuple[_Row, int]]) -> int:
        """Tokens a prompt with `left` to compute takes this step: all within the budget; at least MIN_CHUNK (or
        all it has left) as the step's first prompt chunk; none where less is left and another chunk took it."""
        if budget is None or budget >= left:
            return left
        if not any(count > 1 for _, count in scheduled):
            return min(left, max(budget, MIN_CHUNK))
        return budget if budget >= MIN_CHUNK else 0

    def _run(self, scheduled: List[Tuple[_Row, int]]) -> None:
        """One forward of the scheduled rows; rows whose prompt is now whole (or that decoded) take a token."""
        rows = [PagedRow(row.table, row.computed + count, count) for row, count in scheduled]
        input_ids = torch.tensor([token for row, count in scheduled
                                  for token in row.tokens(row.computed, row.computed + count)], dtype=torch.long)
        logits = self.model.forward(input_ids, PagedBatch(self.model.pool, rows))
        complete = []
        for index, (row, count) in enumerate(scheduled):
            row.computed += count
            if row.computed // self.kv.block_size > row.registered:
                with self._kv_lock:
                    self.kv.register(row.table, row.tokens(0, row.computed))
                row.registered = row.computed // self.kv.block_size
            if row.left == 0:
                complete.append(index)
        if not complete:
            return
        picked = logits[complete] if logits is not None else None
        tokens = next_tokens(self.model, picked, [scheduled[i][0].seq for i in complete])
        now = time.perf_counter()
        for at, index in enumerate(complete):
            row = scheduled[index][0]

            def collect(_row: int, text: str, _finished: bool, row=row) -> None:
                row.text += text

            advance(row.seq, int(tokens[at]), self.tokenizer, self.eos, now, at, collect)


#: the longest a row group whose waiting rows found no KV blocks waits for another group's step before it tries again
BLOCKED_WAIT_S = 0.05


class ContinuousGroups:
    """The live rows of one worker in `groups` ContinuousBatches, each stepped by a thread of its own for as long
    as it has rows: the same calls as one ContinuousBatch. A group never waits for another's step, so on pp the
    stages stay busy across joins and finishes, and a request handed over joins at its group's next step. A new
    request joins the group with the fewest rows. An unseeded request gets its seed in the order requests joined,
    as in one batch. The groups share the KV blocks. A step that fails parks every group after its step in
    flight, and the next call resets them all and raises it."""

    def __init__(self, model: StepModel, tokenizer: Any, eos_ids: Sequence[int], default_seed: int, groups: int,
                 kv: KVBlocks, max_batched_tokens: Optional[int] = None, grammars: Optional[Grammars] = None):
        lock = threading.RLock()
        self.kv = kv
        self.batches = [ContinuousBatch(model, tokenizer, eos_ids, default_seed, kv, max_batched_tokens, grammars,
                                        lock) for _ in range(groups)]
        self.default_seed = default_seed
        self._joined = 0
        self.groups = groups
        self._changed = threading.Condition()
        self._handed: List[list] = [[] for _ in self.batches]  # per group: joining at its next step
        self._cancels: List[List[str]] = [[] for _ in self.batches]  # per group: dropped before its next step
        self._ready: Dict[str, StepOutput] = {}  # outputs since the last call, merged per request
        self._stepped = 0  # steps of all groups
        self._finished = 0  # requests finished
        self._busy = 0  # groups in a step
        self._parked = False  # a step failed, or a reset is under way: no group starts another
        self._failure: Optional[BaseException] = None
        self._closed = False
        self._threads = [threading.Thread(target=self._step_group, args=(index,), daemon=True,
                                          name=f"continuous-rows-{index}") for index in range(groups)]
        for thread in self._threads:
            thread.start()

    def __contains__(self, request_id: str) -> bool:
        with self._changed:
            return (any(request_id == handed[0] for part in self._handed for handed in part)
                    or any(request_id in batch for batch in self.batches))

    def __len__(self) -> int:
        with self._changed:
            return sum(len(batch) + len(part) for batch, part in zip(self.batches, self._handed))

    def load(self) -> Tuple[int, int]:
        loads = [batch.load() for batch in self.batches]
        return (sum(running for running, _ in loads),
                sum(waiting for _, waiting in loads) + sum(len(part) for part in self._handed))

    def kv_usage(self) -> Tuple[int, Optional[int]]:
        return self.batches[0].kv_usage()

    @property
    def preemptions(self) -> int:
        return sum(batch.preemptions for batch in self.batches)

    def cancel(self, request_ids: Sequence[str]) -> None:
        unwanted = set(request_ids)
        with self._changed:
            for index, part in enumerate(self._handed):
                self._handed[index] = [handed for handed in part if handed[0] not in unwanted]
                self._cancels[index] += request_ids

    def steps(self, joining: Sequence[Tuple[str, List[int], SamplingParams]], count: int,
              heartbeat: Optional[Callable[[], None]] = None) -> Dict[str, StepOutput]:
        """Hand `joining` to the groups and return the outputs since the last call once `count` steps (of all the
        groups together) have run since this one, or a request finished, or nothing is left to run.
        `heartbeat()` is called after each step."""
        heartbeat = heartbeat or (lambda: None)
        with self._changed:
            for request_id, prompt, params in joining:
                if params.seed is None:
                    params = dataclasses.replace(params, seed=self.default_seed + self._joined)
                self._joined += 1
                group = min(range(self.groups), key=lambda i: len(self.batches[i]) + len(self._handed[i]))
                self._handed[group].append((request_id, prompt, params))
            self._changed.notify_all()
            start, finished, seen = self._stepped, self._finished, self._stepped
            while self._failure is None and self._live():
                if self._stepped != seen:
                    seen = self._stepped
                    heartbeat()
                if self._stepped - start >= count or self._finished != finished:
                    break
                self._changed.wait()
            if self._failure is not None:
                failure, self._failure = self._failure, None
                self._reset_parked()  # the handler fails every running request with this call
                raise failure
            ready, self._ready = self._ready, {}
        return ready

    def reset(self) -> None:
        with self._changed:
            self._parked = True
            self._reset_parked()

    def close(self) -> None:
        self.reset()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()

    def _live(self) -> bool:
        return self._busy > 0 or any(self._handed) or any(len(batch) for batch in self.batches)

    def _reset_parked(self) -> None:
        """With every group parked (held by the lock), drop every request; then let the groups step again."""
        self._changed.wait_for(lambda: self._busy == 0)
        for batch in self.batches:
            batch.reset()
        self._handed = [[] for _ in self.batches]
        self._cancels = [[] for _ in self.batches]
        self._ready = {}
        self._parked = False

    def _step_group(self, index: int) -> None:
        batch = self.batches[index]
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed or (not self._parked
                                                                and (self._handed[index] or len(batch) > 0)))
                if self._closed:
                    return
                joining, self._handed[index] = self._handed[index], []
                cancels, self._cancels[index] = self._cancels[index], []
                self._busy += 1
            failure = None
            try:
                batch.cancel(cancels)
                outputs = batch.step(joining) if joining or len(batch) else {}
            except BaseException as error:  # noqa: BLE001 - raised by the next call, once every group is parked
                outputs, failure = {}, error
            with self._changed:
                self._busy -= 1
                merge_outputs(self._ready, outputs)
                self._finished += sum(output.result is not None for output in outputs.values())
                self._stepped += 1
                if failure is not None:
                    self._failure, self._parked = self._failure or failure, True
                self._changed.notify_all()
                if failure is None and batch.waiting and not batch.running:
                    # no row could start for want of KV blocks, which other groups' rows hold: step again once
                    # another group has stepped (and may have freed some) rather than spin
                    seen = self._stepped
                    self._changed.wait_for(lambda: self._closed or self._parked or self._handed[index]
                                           or self._stepped != seen, timeout=BLOCKED_WAIT_S)


def continuous_batch(model: StepModel, tokenizer: Any, eos_ids: Sequence[int], default_seed: int,
                     batch_size: int, kv: KVBlocks, max_batched_tokens: Optional[int] = None,
                     grammars: Optional[Grammars] = None) -> Union[ContinuousBatch, ContinuousGroups]:
    """The live requests for `model`: one ContinuousBatch, or ContinuousGroups where the model generates a batch of
    `batch_size` rows in several groups. `kv`: the worker's KV blocks (its size and prefix cache), which outlive
    batches. `grammars`: the model's structured-output side, needed by requests whose parameters carry a grammar."""
    groups = len(model.row_groups(batch_size))
    if groups > 1:
        return ContinuousGroups(model, tokenizer, eos_ids, default_seed, groups, kv, max_batched_tokens, grammars)
    return ContinuousBatch(model, tokenizer, eos_ids, default_seed, kv, max_batched_tokens, grammars)


def kv_blocks_for(prompts: Sequence[List[int]], params: Sequence[SamplingParams]) -> KVBlocks:
    """KV blocks enough for a static batch of `prompts` to run whole, without a prefix cache."""
    probe = KVBlocks(1)
    return KVBlocks(sum(probe.blocks_for(len(prompt) + p.max_new_tokens) for prompt, p in zip(prompts, params)))


def generate(model: StepModel, tokenizer: Any, prompts: Sequence[List[int]], params: Sequence[SamplingParams],
             default_seed: int, eos_ids: Sequence[int], on_step: Optional[Callable[[int, StepOutput], None]] = None,
             max_batched_tokens: Optional[int] = None, kv: Optional[KVBlocks] = None,
             grammars: Optional[Grammars] = None, heartbeat: Optional[Callable[[], None]] = None) -> List[SequenceResult]:
    """Generate a static batch of tokenized prompts until each sequence stops: the continuous loop with every
    request joining at once, so finished rows leave the batch instead of stepping on with padding. A row without
    a seed samples with `default_seed + its row`. `on_step(row, output)` streams each step's output. `kv`: the
    worker's KV blocks, which outlive the batch (default: enough for this batch, no prefix cache). `grammars`: as
    for continuous_batch. `heartbeat()` is called after every step (a sign of progress for a watchdog)."""
    kv = kv or kv_blocks_for(prompts, params)
    live = continuous_batch(model, tokenizer, eos_ids, default_seed, len(prompts), kv, max_batched_tokens, grammars)
    try:
        ids = [str(row) for row in range(len(prompts))]
        joining = list(zip(ids, prompts, params))
        results: Dict[str, SequenceResult] = {}
        while joining or len(live):
            # one step per call where text streams; else until a row finishes (no new request can take its place)
            outputs = live.steps(joining, 1 if on_step is not None else max(p.max_new_tokens for p in params),
                                 heartbeat=heartbeat)
            joining = []
            for request_id, output in outputs.items():
                if on_step is not None and (output.text or output.logprobs or output.result is not None):
                    on_step(int(request_id), output)
                if output.result is not None:
                    results[request_id] = output.result
        return [results[request_id] for request_id in ids]
    finally:
        live.close()
