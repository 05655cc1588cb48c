"""The one step loop: requests join and leave the running batch between decode steps, and long prompts are
prefilled in chunks within a token budget. Static and continuous batching both run it.

TorchServe's ContinuousBatching aggregator (`continuousBatching: true`) calls the handler again and again, each
time with the requests still running plus new ones up to batchSize; the handler hands them to a thread that steps
the batch on its own (ts_plugin.step_loop). `ContinuousBatch.step` runs one decode step for the running rows,
then prefills waiting requests within `handler.max_num_batched_tokens` (whole prompts that fit, and one chunk of
the first that does not), and lets finished rows go. A static batch (`generate`) is
the same loop with every request joining at once, so its finished rows leave instead of stepping on with
padding.

The KV cache: one batched cache for all live rows (transformers' DynamicCache, as every engine already keeps it,
whose full-attention layers append in place: engines/_kv_cache.py), left-padded like a static batch. New rows
are prefilled together on a cache of their own (a chunked prompt on one of its own, a chunk per step), then both
caches are padded on the left to one length and concatenated (`StepModel.merge`); finished and cancelled rows
are cut out, and positions that no remaining row attends are cropped from the left (`StepModel.select_rows`).
Every engine keeps its own part of that cache (a tp rank its heads, a pp stage its layers) and applies the same
row edits to it, so the same code serves tp, pp, pptp and custom: on tp and pptp every rank gets the same batch
and takes the same decisions (they depend on the calls alone, never on timing), in pp rank 0 sends the edits
down the stages.
Why not per-row caches with their own positions: each step would run one forward per row, which gives up
batching. Why not transformers' continuous_batching (paged cache, scheduler, manager): it runs its own thread
and a paged attention path over the whole model in one process, sizes its cache for unsharded heads (a
DeepSpeed-sharded rank or a pp stage with some layers is outside it) and has one seed for all requests, where a
seeded request here must give the same tokens alone or beside others; so only the engines' own forward is used.
The price of left padding: a long-running row keeps the batch as wide as its history; cropping reclaims it
when that row leaves. Prefix caching keeps copies instead of pages: a prompt's full blocks are copied out after
its prefill (ts_plugin.prefix_cache), and a later prompt that starts with them begins from a copy of them and
prefills the rest as chunks. The memory bound (`kv_tokens`, from handler.kv_cache_memory) counts padded positions:
requests wait while it is full and the newest row is preempted and recomputed when the rows outgrow it.

Where the engine splits a batch into row groups (pp with `pippy.chunks`: at most one group per stage),
`ContinuousGroups` keeps one ContinuousBatch per group and steps them in threads of their own: while stage 1
runs one group's step, stage 0 runs another's.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .engines.base import StepModel
from .generation import (SequenceResult, TokenLogprob, _Sequence, advance, left_padded, new_sequence, next_tokens,
                         pad_token_id)
from .prefix_cache import PrefixIndex
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
    answered: bool = False  # its result went out (a batch that cannot drop rows keeps it until the last one ends)


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


class _Pending:
    """A request that has not joined the rows yet: waiting, or with the first `done` of its tokens prefilled into a
    cache of its own (a chunked prefill). Its tokens are the prompt, and for a preempted row the tokens it had
    generated (recomputed, as vLLM does: the next token follows from the last one's logits)."""

    def __init__(self, row: _Row):
        self.row = row
        self.ids = row.seq.prompt_ids + row.seq.token_ids
        self.cache: Any = None
        self.done = 0

    @property
    def left(self) -> int:
        return len(self.ids) - self.done


class ContinuousBatch:
    """The live requests of one worker, and the one step loop over them: every rank that runs generation keeps
    one and calls it identically (so every decision below is a function of the calls alone, never of timing).

    At each step the running rows decode one token, then waiting requests are prefilled within a token budget
    (`max_batched_tokens`, each running row counting one): prompts that fit join together in one left-padded
    forward; the first that does not is prefilled in chunks, one per step, on a cache of its own, and joins when
    its last chunk gives its first token. So a long prompt delays the running rows' next token by one chunk's
    forward at a time instead of by its whole prefill. Without a budget every prompt joins whole.

    `kv_tokens` bounds the KV positions the batch holds: rows x the widest row (left padding included), counting a
    request that is being prefilled as joined. Waiting requests join in arrival order while the next decode step
    fits; when the running rows outgrow it, the newest is preempted (its cache dropped, it waits first in line and
    its prompt and tokens are prefilled again). A request whose prompt and max_new_tokens alone exceed it is refused.

    Example::

        batch = ContinuousBatch(step_model, tokenizer, eos_ids=[2], default_seed=42, max_batched_tokens=256)
        out = batch.step([("req-1", prompt_ids, SamplingParams(max_new_tokens=16))])  # prefill, first token
        while not out["req-1"].result:
            out = batch.step([])  # one token per live row
    """

    groups = 1  # row groups stepped concurrently (ContinuousGroups has more)

    def __init__(self, model: StepModel, tokenizer: Any, eos_ids: Sequence[int], default_seed: int,
                 max_batched_tokens: Optional[int] = None, rows_editable: bool = True,
                 prefix: Optional[PrefixIndex] = None, grammars: Optional[Grammars] = None,
                 kv_tokens: Optional[int] = None):
        self.model = model
        self.grammars = grammars
        self.prefix = prefix if rows_editable else None  # a prefix hit joins like a chunk, which needs row edits
        # False for a cache whose layers cannot drop or add rows (sliding windows): then a batch is static, every
        # request joins at once and whole, and a finished row stays, fed padding, until the last one finishes
        self.rows_editable = rows_editable
        self.tokenizer = tokenizer
        self.eos = set(eos_ids)
        self.pad_id = pad_token_id(tokenizer, eos_ids)
        self.default_seed = default_seed
        self.max_batched_tokens = max_batched_tokens
        self.kv_tokens = kv_tokens if rows_editable else None  # a static batch of uneditable rows joins at once
        self.preemptions = 0
        self._joined = 0  # requests so far: an unseeded one samples with default_seed + this
        self.rows: List[_Row] = []
        self.waiting: List[_Pending] = []  # in arrival order
        self.cache: Any = None
        self.mask: Optional[torch.Tensor] = None  # [rows, positions]
        self.positions: Optional[torch.Tensor] = None  # [rows, 1]: the last position of each row
        self.tokens: Optional[torch.Tensor] = None  # [rows]: the token each row feeds next

    def __contains__(self, request_id: str) -> bool:
        return any(row.request_id == request_id for row in self._all_rows())

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    def load(self) -> Tuple[int, int]:
        """(rows running, counting those part-prefilled; rows waiting for their prefill), as vLLM counts them."""
        started = sum(1 for pending in self.waiting if pending.cache is not None)
        return len(self.rows) + started, len(self.waiting) - started

    def kv_usage(self) -> Tuple[int, Optional[int]]:
        """(KV positions held after the next decode step, counting requests being prefilled as joined; the bound)."""
        return self._footprint(), self.kv_tokens

    def _all_rows(self) -> List[_Row]:
        return self.rows + [pending.row for pending in self.waiting]

    def cancel(self, request_ids: Sequence[str]) -> None:
        """Drop these requests, waiting or running (their client went away); ids not here are ignored."""
        unwanted = set(request_ids)
        for pending in [pending for pending in self.waiting if pending.row.request_id in unwanted]:
            self.waiting.remove(pending)
            self.model.end(pending.cache)
        if any(row.request_id in unwanted for row in self.rows):
            self._keep([i for i, row in enumerate(self.rows) if row.request_id not in unwanted])

    def step(self, joining: Sequence[Tuple[str, List[int], SamplingParams]]) -> Dict[str, StepOutput]:
        """One token for every running row, then prefill within the budget; rows that finish leave the batch.
        Returns the output of this step of every live request (an empty one while a request waits or prefills)."""
        for row in self.rows:
            row.text = ""
        started = time.perf_counter()
        for request_id, prompt, params in joining:
            if self.kv_tokens is not None and len(prompt) + params.max_new_tokens > self.kv_tokens:
                raise ValueError(f"request {request_id} needs {len(prompt) + params.max_new_tokens} KV positions; "
                                 f"the batch holds {self.kv_tokens} (the handler refuses it before it gets here)")
        for request_id, prompt, params in joining:
            seq = new_sequence(prompt, params, self.default_seed + self._joined, self.grammars)
            self.waiting.append(_Pending(_Row(request_id, seq, started)))
            self._joined += 1
        try:
            self._preempt_to_fit()
            if self.rows:
                self._decode()
            whole, chunks = self._schedule()
            if whole:
                self._join(whole)
            for pending, size in chunks:
                self._prefill_chunk(pending, size)
        except BaseException:
            self.reset()  # the caches are out of step with the rows: every live request fails with this call
            raise
        outputs = {}
        now = time.perf_counter()
        for row in self.rows:
            if row.answered:
                continue
            result = None
            if row.seq.finish_reason:
                seq, row.answered = row.seq, True
                result = SequenceResult(seq.text, seq.token_ids, len(seq.prompt_ids), seq.finish_reason,
                                        (seq.first_token_at or row.started) - row.started, now - row.started,
                                        seq.logprobs if seq.params.logprobs is not None else None,
                                        row.cached_tokens, seq.end_logprob)
            new_logprobs = row.seq.logprobs[row.logprobs_sent:]
            row.logprobs_sent += len(new_logprobs)
            outputs[row.request_id] = StepOutput(row.text, result, new_logprobs)
        for pending in self.waiting:
            outputs[pending.row.request_id] = StepOutput("", None)
        running = [i for i, row in enumerate(self.rows) if not row.seq.finish_reason]
        if len(running) < len(self.rows) and (self.rows_editable or not running):
            self._keep(running)
        return outputs

    def steps(self, joining: Sequence[Tuple[str, List[int], SamplingParams]], count: int,
              slot_freed: Optional[threading.Event] = None,
              heartbeat: Optional[Callable[[], None]] = None) -> Dict[str, StepOutput]:
        """Up to `count` steps, the first with `joining`; fewer once a row finishes (here, or in another group that
        shares `slot_freed`), since its slot is then free for a new request. Each request's output holds its text
        of all the steps. `heartbeat()` is called after each step."""
        slot_freed = slot_freed or threading.Event()
        heartbeat = heartbeat or (lambda: None)
        outputs = self.step(joining)
        heartbeat()
        for _ in range(count - 1):
            if any(output.result for output in outputs.values()):
                slot_freed.set()
            if not len(self) or slot_freed.is_set():
                break
            for request_id, output in self.step([]).items():
                outputs[request_id] = outputs[request_id].then(output)
            heartbeat()
        return outputs

    def reset(self) -> None:
        """Drop every request and release the caches."""
        cache, self.cache = self.cache, None
        waiting, self.waiting = self.waiting, []
        self.rows, self.mask, self.positions, self.tokens = [], None, None, None
        for part in [cache] + [pending.cache for pending in waiting]:
            if part is not None:
                self.model.end(part)

    def close(self) -> None:
        self.reset()

    # --- internals -------------------------------------------------------------------------------------------

    def _footprint(self, admitted: Sequence[_Pending] = ()) -> int:
        """KV positions the running batch holds after its next decode step if the requests being prefilled and
        `admitted` have joined it: every row is as wide as the widest."""
        width = self.mask.shape[1] if self.rows else 0
        lengths = [len(p.ids) for p in self.waiting if p.cache is not None or any(p is a for a in admitted)]
        rows = len(self.rows) + len(lengths)
        return rows * (max([width] + lengths) + 1) if rows else 0

    def _fits(self, admitted: Sequence[_Pending]) -> bool:
        return self.kv_tokens is None or self._footprint(admitted) <= self.kv_tokens

    def _preempt_to_fit(self) -> None:
        """Free KV positions for the next decode step, newest work first: a part-prefilled request starts over
        later, a running row is cut out and waits, first in line, to be prefilled again with its tokens."""
        while not self._fits(()):
            started = [pending for pending in self.waiting if pending.cache is not None]
            if started:
                pending = started[-1]
                self.model.end(pending.cache)
                pending.cache, pending.done = None, 0
            else:
                row = self.rows[-1]
                self._keep(list(range(len(self.rows) - 1)))
                self.waiting.insert(0, _Pending(row))
            self.preemptions += 1

    def _schedule(self) -> Tuple[List[_Pending], List[Tuple[_Pending, int]]]:
        """The waiting requests that join whole this step, and the (request, tokens) of this step's chunks: a
        prompt that starts from a prefix-cache hit or is part prefilled goes on where it stands. The first chunk
        takes at least MIN_CHUNK tokens, so a prompt makes progress beside any batch. Requests start in arrival
        order while the KV bound holds; the first that does not fit stops the rest."""
        if not self.rows_editable:
            if self.rows and self.waiting:
                raise RuntimeError("this model's KV cache cannot take rows into a running batch (sliding-window "
                                   "layers): every request of a batch must join at once")
            whole, self.waiting = self.waiting, []
            return whole, []
        budget = None if self.max_batched_tokens is None else self.max_batched_tokens - len(self.rows)
        whole: List[_Pending] = []
        chunks: List[Tuple[_Pending, int]] = []
        admitted: List[_Pending] = []  # not started before this step
        for pending in self.waiting:
            if budget is not None and budget <= 0 and chunks:
                break
            if pending.cache is None:
                if not self._fits(admitted + [pending]):
                    break
                admitted.append(pending)
            if pending.cache is None and not self._reuse_prefix(pending):
                if budget is None or pending.left <= budget:
                    whole.append(pending)
                    budget = None if budget is None else budget - pending.left
                continue
            if budget is None:
                size = pending.left
            elif not chunks:
                size = min(pending.left, max(budget, MIN_CHUNK))
            elif budget >= min(pending.left, MIN_CHUNK):
                size = min(pending.left, budget)
            else:
                continue
            chunks.append((pending, size))
            budget = None if budget is None else budget - size
        for pending in whole:
            self.waiting.remove(pending)
        if not chunks and self.waiting and any(self.waiting[0] is a for a in admitted):
            first = self.waiting[0]  # none fits the token budget whole: the first starts a chunked prefill
            chunks.append((first, min(first.left, max(budget, MIN_CHUNK))))
        return whole, chunks

    def _reuse_prefix(self, pending: _Pending) -> bool:
        """Start `pending` from the cached blocks that begin its prompt, if any."""
        if self.prefix is None:
            return False
        with self.prefix.lock:
            blocks = self.prefix.match(pending.ids)
            if not blocks:
                return False
            pending.cache = self.model.cache_from_prefix(blocks)
        pending.done = len(blocks) * self.prefix.block_size
        if not pending.row.seq.token_ids:  # a recomputed row's hit is not the prompt's
            pending.row.cached_tokens = pending.done
        return True

    def _remember_prompts(self, rows: List[_Row], cache: Any, pads: List[int]) -> None:
        """Keep the full blocks of the prompts just prefilled in `cache` (row i's tokens start at pads[i])."""
        if self.prefix is None:
            return
        size = self.prefix.block_size
        with self.prefix.lock:
            for index, (row, pad) in enumerate(zip(rows, pads)):
                new, evicted = self.prefix.insert(row.seq.prompt_ids)
                if evicted:
                    self.model.drop_prefix(evicted)
                if new:
                    self.model.save_prefix(cache, index, [(block, pad + at * size) for block, at in new], size)

    def _advance_all(self, rows: List[_Row], tokens: torch.Tensor) -> None:
        now = time.perf_counter()

        def collect(row_index: int, text: str, finished: bool) -> None:
            rows[row_index].text += text

        for index, row in enumerate(rows):
            if row.seq.finish_reason:  # a finished row kept in a batch that cannot drop it: fed padding
                tokens[index] = self.pad_id
            else:
                advance(row.seq, int(tokens[index]), self.tokenizer, self.eos, now, index, collect)

    def _decode(self) -> None:
        input_ids = self.tokens.view(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        self.positions = self.positions + 1
        logits, self.cache = self.model.forward(input_ids, self.mask, self.positions, self.cache)
        self.tokens = next_tokens(self.model, logits, [row.seq for row in self.rows])
        self._advance_all(self.rows, self.tokens)

    def _join(self, joining: List[_Pending]) -> None:
        """Prefill whole prompts together, left-padded, and add them to the rows."""
        rows = [pending.row for pending in joining]
        input_ids, mask, positions = left_padded([pending.ids for pending in joining], self.pad_id)
        logits, cache = self.model.forward(input_ids, mask, positions, None)
        self._remember_prompts(rows, cache, [mask.shape[1] - len(pending.ids) for pending in joining])
        self._add_rows(rows, logits, cache, mask, positions[:, -1:])

    def _prefill_chunk(self, pending: _Pending, size: int) -> None:
        """The next `size` prompt tokens of `pending` into its own cache; with the last, it joins the rows."""
        end = pending.done + size
        input_ids = torch.tensor([pending.ids[pending.done:end]], dtype=torch.long)
        mask = torch.ones((1, end), dtype=torch.long)
        positions = torch.arange(pending.done, end, dtype=torch.long).view(1, -1)
        logits, pending.cache = self.model.forward(input_ids, mask, positions, pending.cache)
        pending.done = end
        if pending.left:
            return
        self.waiting.remove(pending)
        self._remember_prompts([pending.row], pending.cache, [0])
        self._add_rows([pending.row], logits, pending.cache, mask, positions[:, -1:])

    def _add_rows(self, rows: List[_Row], logits, cache: Any, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Rows whose prompts are in `cache`: choose their first tokens and merge them into the running batch."""
        try:
            tokens = next_tokens(self.model, logits, [row.seq for row in rows])
        except BaseException:
            self.model.end(cache)
            raise
        self._advance_all(rows, tokens)
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.tokens = rows, cache, mask, positions, tokens
            return
        width, joining_width = self.mask.shape[1], mask.shape[1]
        pad, joining_pad = max(0, joining_width - width), max(0, width - joining_width)
        self.cache = self.model.merge(self.cache, cache, pad, joining_pad)
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (pad, 0)),
                               torch.nn.functional.pad(mask, (joining_pad, 0))])
        self.rows += rows
        self.positions = torch.cat([self.positions, positions])
        self.tokens = torch.cat([self.tokens, tokens])

    def _keep(self, kept: List[int]) -> None:
        if not kept:
            cache, self.cache = self.cache, None
            self.rows, self.mask, self.positions, self.tokens = [], None, None, None
            if cache is not None:
                self.model.end(cache)
            return
        mask = self.mask[kept]
        crop = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading positions no kept row attends
        self.cache = self.model.select_rows(self.cache, kept, crop)
        self.mask = mask[:, crop:]
        self.rows = [self.rows[i] for i in kept]
        self.positions, self.tokens = self.positions[kept], self.tokens[kept]


class ContinuousGroups:
    """The live rows of one worker in `groups` ContinuousBatches, stepped concurrently; the same calls as one
    ContinuousBatch. A new request joins the group with the fewest rows. An unseeded request gets its seed in the
    order requests joined, as in one batch. `kv_tokens` is shared out evenly: each group holds a cache of its own."""

    def __init__(self, model: StepModel, tokenizer: Any, eos_ids: Sequence[int], default_seed: int, groups: int,
                 max_batched_tokens: Optional[int] = None, rows_editable: bool = True,
                 prefix: Optional[PrefixIndex] = None, grammars: Optional[Grammars] = None,
                 kv_tokens: Optional[int] = None):
        share = None if kv_tokens is None else kv_tokens // groups
        self.batches = [ContinuousBatch(model, tokenizer, eos_ids, default_seed, max_batched_tokens, rows_editable,
                                        prefix, grammars, share) for _ in range(groups)]
        self.default_seed = default_seed
        self._joined = 0
        self.groups = groups
        self._pool = ThreadPoolExecutor(groups, thread_name_prefix="continuous-rows")

    def __contains__(self, request_id: str) -> bool:
        return any(request_id in batch for batch in self.batches)

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def load(self) -> Tuple[int, int]:
        loads = [batch.load() for batch in self.batches]
        return sum(running for running, _ in loads), sum(waiting for _, waiting in loads)

    def kv_usage(self) -> Tuple[int, Optional[int]]:
        usages = [batch.kv_usage() for batch in self.batches]
        bounds = [bound for _, bound in usages]
        return sum(used for used, _ in usages), None if None in bounds else sum(bounds)

    @property
    def preemptions(self) -> int:
        return sum(batch.preemptions for batch in self.batches)

    def cancel(self, request_ids: Sequence[str]) -> None:
        for batch in self.batches:
            batch.cancel(request_ids)

    def steps(self, joining: Sequence[Tuple[str, List[int], SamplingParams]], count: int,
              heartbeat: Optional[Callable[[], None]] = None) -> Dict[str, StepOutput]:
        parts: List[list] = [[] for _ in self.batches]
        for request_id, prompt, params in joining:
            if params.seed is None:
                params = dataclasses.replace(params, seed=self.default_seed + self._joined)
            self._joined += 1
            group = min(range(len(self.batches)), key=lambda i: len(self.batches[i]) + len(parts[i]))
            parts[group].append((request_id, prompt, params))
        # the groups stop together once one frees a slot: a group stepping alone would leave the other stages idle
        slot_freed = threading.Event()
        futures = [self._pool.submit(batch.steps, part, count, slot_freed, heartbeat)
                   for batch, part in zip(self.batches, parts) if part or len(batch)]
        outputs: Dict[str, StepOutput] = {}
        failure: Optional[BaseException] = None
        for future in futures:
            try:
                outputs.update(future.result())
            except BaseException as error:  # noqa: BLE001 - raised below, once every group has stopped
                failure = failure or error
        if failure is not None:
            self.reset()  # the handler fails every running request with this call
            raise failure
        return outputs

    def reset(self) -> None:
        for batch in self.batches:
            batch.reset()

    def close(self) -> None:
        self.reset()
        self._pool.shutdown(wait=True)


def continuous_batch(model: StepModel, tokenizer: Any, eos_ids: Sequence[int], default_seed: int,
                     batch_size: int, max_batched_tokens: Optional[int] = None, rows_editable: bool = True,
                     prefix: Optional[PrefixIndex] = None, grammars: Optional[Grammars] = None,
                     kv_tokens: Optional[int] = None) -> Union[ContinuousBatch, ContinuousGroups]:
    """The live requests for `model`: one ContinuousBatch, or ContinuousGroups where the model generates a batch of
    `batch_size` rows in several groups. `prefix`: the worker's prefix cache, None for none. `grammars`: the
    model's structured-output side, needed by requests whose parameters carry a grammar. `kv_tokens`: the KV
    positions all groups together may hold (kv_tokens_per_rank), None for no bound."""
    groups = len(model.row_groups(batch_size))
    if groups > 1:
        return ContinuousGroups(model, tokenizer, eos_ids, default_seed, groups, max_batched_tokens, rows_editable,
                                prefix, grammars, kv_tokens)
    return ContinuousBatch(model, tokenizer, eos_ids, default_seed, max_batched_tokens, rows_editable, prefix,
                           grammars, kv_tokens)


def generate(model: StepModel, tokenizer: Any, prompts: Sequence[List[int]], params: Sequence[SamplingParams],
             default_seed: int, eos_ids: Sequence[int], on_step: Optional[Callable[[int, StepOutput], None]] = None,
             max_batched_tokens: Optional[int] = None, rows_editable: bool = True,
             prefix: Optional[PrefixIndex] = None, grammars: Optional[Grammars] = None,
             kv_tokens: Optional[int] = None, heartbeat: Optional[Callable[[], None]] = None) -> List[SequenceResult]:
    """Generate a static batch of tokenized prompts until each sequence stops: the continuous loop with every
    request joining at once, so finished rows leave the batch instead of stepping on with padding. A row without
    a seed samples with `default_seed + its row`. `on_step(row, output)` streams each step's output.
    `rows_editable`: False where the model's cache cannot drop rows (see ContinuousBatch). `prefix`: the worker's
    prefix cache, which outlives the batch. `grammars` and `kv_tokens`: as for continuous_batch. `heartbeat()` is
    called after every step (a sign of progress for a watchdog)."""
    live = continuous_batch(model, tokenizer, eos_ids, default_seed, len(prompts), max_batched_tokens, rows_editable,
                            prefix, grammars, kv_tokens)
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
