"""Continuous batching: requests join and leave the running batch between decode steps.

TorchServe's ContinuousBatching aggregator (`continuousBatching: true`) calls the handler again and again, each
time with the requests still running plus new ones up to batchSize; `ContinuousBatch.step` runs one decode step
for the running rows, then prefills the new rows and adds them, and lets finished rows go.

The KV cache: one batched cache for all live rows (transformers' DynamicCache, as every engine already keeps it),
left-padded like a static batch. New rows are prefilled together on a cache of their own, then both caches are
padded on the left to one length and concatenated (`StepModel.merge`); finished and cancelled rows are cut out,
and positions that no remaining row attends are cropped from the left (`StepModel.select_rows`). Every engine
keeps its own part of that cache (a tp rank its heads, a pp stage its layers) and applies the same row edits to
it, so the same code serves tp, pp, pptp and custom: on tp and pptp every rank gets the same batch and takes the
same join/leave decisions, in pp rank 0 sends the edits down the stages.
Why not per-row caches with their own positions: each step would run one forward per row, which gives up
batching. Why not transformers' continuous_batching (paged cache, scheduler, manager): it runs its own thread
and a paged attention path over the whole model in one process, sizes its cache for unsharded heads (a
DeepSpeed-sharded rank or a pp stage with some layers is outside it) and has one seed for all requests, where a
seeded request here must give the same tokens alone or beside others; so only the engines' own forward is used.
The price of left padding: a long-running row keeps the batch as wide as its history; cropping reclaims it
when that row leaves.

Where the engine splits a batch into row groups (pp with `pippy.chunks`: at most one group per stage),
`ContinuousGroups` keeps one ContinuousBatch per group and steps them in threads of their own, as `generate`
does for a static batch: while stage 1 runs one group's step, stage 0 runs another's.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .engines.base import StepModel
from .generation import SequenceResult, _Sequence, advance, left_padded, new_sequence, next_tokens, pad_token_id
from .requests import SamplingParams


@dataclass
class _Row:
    request_id: str
    seq: _Sequence
    started: float
    text: str = ""  # new text of this step, for streaming


@dataclass
class StepOutput:
    """What a step produced for one request: its new text, and its result once it finished."""

    text: str
    result: Optional[SequenceResult]


class ContinuousBatch:
    """The live rows of one worker. Every rank that runs generation keeps one and calls it identically.

    Example::

        batch = ContinuousBatch(step_model, tokenizer, eos_ids=[2], default_seed=42)
        out = batch.step([("req-1", prompt_ids, SamplingParams(max_new_tokens=16))])  # prefill, first token
        while not out["req-1"].result:
            out = batch.step([])  # one token per live row
    """

    groups = 1  # row groups stepped concurrently (ContinuousGroups has more)

    def __init__(self, model: StepModel, tokenizer: Any, eos_ids: Sequence[int], default_seed: int):
        self.model = model
        self.tokenizer = tokenizer
        self.eos = set(eos_ids)
        self.pad_id = pad_token_id(tokenizer, eos_ids)
        self.default_seed = default_seed
        self._joined = 0  # requests so far: an unseeded one samples with default_seed + this
        self.rows: List[_Row] = []
        self.cache: Any = None
        self.mask: Optional[torch.Tensor] = None  # [rows, positions]
        self.positions: Optional[torch.Tensor] = None  # [rows, 1]: the last position of each row
        self.tokens: Optional[torch.Tensor] = None  # [rows]: the token each row feeds next

    def __contains__(self, request_id: str) -> bool:
        return any(row.request_id == request_id for row in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def keep_only(self, request_ids: Sequence[str]) -> List[str]:
        """Cancel the rows whose request is not in `request_ids` (the frontend dropped it: its client went away);
        returns the cancelled request ids."""
        wanted = set(request_ids)
        cancelled = [row.request_id for row in self.rows if row.request_id not in wanted]
        if cancelled:
            self._keep([i for i, row in enumerate(self.rows) if row.request_id in wanted])
        return cancelled

    def step(self, joining: Sequence[Tuple[str, List[int], SamplingParams]]) -> Dict[str, StepOutput]:
        """One token for every live row and the first token of every joining (request id, prompt, params) row;
        rows that finish leave the batch. Returns each live or joining request's output of this step."""
        for row in self.rows:
            row.text = ""
        try:
            if self.rows:
                self._decode()
            if joining:
                self._join(joining)
        except BaseException:
            self.reset()  # the caches are out of step with the rows: every live request fails with this call
            raise
        outputs = {}
        now = time.perf_counter()
        for row in self.rows:
            result = None
            if row.seq.finish_reason:
                seq = row.seq
                result = SequenceResult(seq.text, seq.token_ids, len(seq.prompt_ids), seq.finish_reason,
                                        (seq.first_token_at or row.started) - row.started, now - row.started)
            outputs[row.request_id] = StepOutput(row.text, result)
        finished = [i for i, row in enumerate(self.rows) if row.seq.finish_reason]
        if finished:
            self._keep([i for i in range(len(self.rows)) if i not in finished])
        return outputs

    def steps(self, joining: Sequence[Tuple[str, List[int], SamplingParams]], count: int,
              slot_freed: Optional[threading.Event] = None) -> Dict[str, StepOutput]:
        """Up to `count` steps, the first with `joining`; fewer once a row finishes (here, or in another group that
        shares `slot_freed`), since its slot is then free for a new request. Each request's output holds its text
        of all the steps."""
        slot_freed = slot_freed or threading.Event()
        outputs = self.step(joining)
        for _ in range(count - 1):
            if any(output.result for output in outputs.values()):
                slot_freed.set()
            if not self.rows or slot_freed.is_set():
                break
            for request_id, output in self.step([]).items():
                outputs[request_id] = StepOutput(outputs[request_id].text + output.text, output.result)
        return outputs

    def reset(self) -> None:
        """Drop every row and release the cache."""
        cache, self.cache = self.cache, None
        self.rows, self.mask, self.positions, self.tokens = [], None, None, None
        if cache is not None:
            self.model.end(cache)

    # --- internals -------------------------------------------------------------------------------------------

    def _advance_all(self, rows: List[_Row], tokens: torch.Tensor) -> None:
        now = time.perf_counter()

        def collect(row_index: int, text: str, finished: bool) -> None:
            rows[row_index].text += text

        for index, row in enumerate(rows):
            advance(row.seq, int(tokens[index]), self.tokenizer, self.eos, now, index, collect)

    def _decode(self) -> None:
        input_ids = self.tokens.view(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        self.positions = self.positions + 1
        logits, self.cache = self.model.forward(input_ids, self.mask, self.positions, self.cache)
        self.tokens = next_tokens(self.model, logits, [row.seq for row in self.rows])
        self._advance_all(self.rows, self.tokens)

    def _join(self, joining: Sequence[Tuple[str, List[int], SamplingParams]]) -> None:
        started = time.perf_counter()
        rows = []
        for request_id, prompt, params in joining:
            rows.append(_Row(request_id, new_sequence(prompt, params, self.default_seed + self._joined), started))
            self._joined += 1
        input_ids, mask, positions = left_padded([row.seq.prompt_ids for row in rows], self.pad_id)
        logits, cache = self.model.forward(input_ids, mask, positions, None)
        try:
            tokens = next_tokens(self.model, logits, [row.seq for row in rows])
        except BaseException:
            self.model.end(cache)
            raise
        self._advance_all(rows, tokens)
        positions = positions[:, -1:]
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
            self.reset()
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
    order requests joined, as in one batch."""

    def __init__(self, model: StepModel, tokenizer: Any, eos_ids: Sequence[int], default_seed: int, groups: int):
        self.batches = [ContinuousBatch(model, tokenizer, eos_ids, default_seed) for _ in range(groups)]
        self.default_seed = default_seed
        self._joined = 0
        self.groups = groups
        self._pool = ThreadPoolExecutor(groups, thread_name_prefix="continuous-rows")

    def __contains__(self, request_id: str) -> bool:
        return any(request_id in batch for batch in self.batches)

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def keep_only(self, request_ids: Sequence[str]) -> List[str]:
        return [cancelled for batch in self.batches for cancelled in batch.keep_only(request_ids)]

    def steps(self, joining: Sequence[Tuple[str, List[int], SamplingParams]], count: int) -> Dict[str, StepOutput]:
        parts: List[list] = [[] for _ in self.batches]
        for request_id, prompt, params in joining:
            if params.seed is None:
                params = dataclasses.replace(params, seed=self.default_seed + self._joined)
            self._joined += 1
            group = min(range(len(self.batches)), key=lambda i: len(self.batches[i]) + len(parts[i]))
            parts[group].append((request_id, prompt, params))
        # the groups stop together once one frees a slot: a group stepping alone would leave the other stages idle
        slot_freed = threading.Event()
        futures = [self._pool.submit(batch.steps, part, count, slot_freed)
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


def continuous_batch(model: StepModel, tokenizer: Any, eos_ids: Sequence[int], default_seed: int,
                     batch_size: int) -> Union[ContinuousBatch, ContinuousGroups]:
    """The live rows for `model`: one ContinuousBatch, or ContinuousGroups where the model generates a batch of
    `batch_size` rows in several groups."""
    groups = len(model.row_groups(batch_size))
    if groups > 1:
        return ContinuousGroups(model, tokenizer, eos_ids, default_seed, groups)
    return ContinuousBatch(model, tokenizer, eos_ids, default_seed)
