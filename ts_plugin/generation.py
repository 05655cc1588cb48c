"""Sequences, sampling and incremental decoding, shared by every engine: what a step does with the logits.

The step loop itself is `ts_plugin.continuous` (static batches go through it too). An engine supplies a
`StepModel` (ts_plugin.engines.base): one forward step over the batch, returning the last position's logits,
plus `share_tokens` to give every rank the tokens chosen on the driver.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .distributed import InStepError
from .engines.base import StepModel
from .requests import SamplingParams, stop_span
from .structured_output import Grammars, RowGrammar


#: a chosen token's log-probability: (token id, its log-probability, [(alternative id, log-probability), ...])
TokenLogprob = Tuple[int, float, List[Tuple[int, float]]]


@dataclass
class SequenceResult:
    text: str
    token_ids: List[int]
    prompt_tokens: int
    finish_reason: str  # length | eos_token | stop_sequence
    time_to_first_token_s: float
    seconds: float
    logprobs: Optional[List[TokenLogprob]] = None  # per token of token_ids, where asked (on the driver rank)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    end_logprob: Optional[TokenLogprob] = None  # the end-of-sequence token it ended with, where logprobs were asked

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _Sequence:
    prompt_ids: List[int]
    params: SamplingParams
    generator: torch.Generator
    token_ids: List[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    finish_reason: Optional[str] = None
    first_token_at: Optional[float] = None
    # incremental decoding: seq.text holds the text of token_ids[:read_offset]; prefix_offset is where the
    # fallback's window starts, or how many tokens the fast tokenizer's DecodeStream (`decoder`) was given
    prefix_offset: int = 0
    read_offset: int = 0
    decoder: Any = None
    logprobs: List[TokenLogprob] = field(default_factory=list)  # filled where tokens are chosen (the driver)
    end_logprob: Optional[TokenLogprob] = None  # the end of sequence's entry, taken out of logprobs
    grammar: Optional[RowGrammar] = None  # structured output: what the next token may be
    _processors: Optional[Tuple[Any, Any]] = None

    @property
    def sampling(self) -> bool:
        p = self.params
        return p.do_sample or p.temperature != 1.0 or p.top_k > 0 or p.top_p < 1.0

    @property
    def processors(self) -> Tuple[Any, Any]:
        """(logits processors for every row, warpers for sampled rows), made once per sequence."""
        if self._processors is None:
            self._processors = _processors(self.params, len(self.prompt_ids))
        return self._processors


# (index in batch, new text, finished) -> None
StreamCallback = Callable[[int, str, bool], None]


def choose_tokens(logits: torch.Tensor, sequences: Sequence[_Sequence]) -> torch.Tensor:
    """Greedy or sampled next token per row, each with its own parameters and generator: the grammar's mask, the
    logit bias and penalties, then (sampled rows) transformers' temperature, top-k and top-p warpers, in generate's
    order. A row that asks for logprobs gets them from the distribution its token was drawn from: after the mask,
    bias and penalties, and for a sampled row after the warpers too."""
    chosen = torch.empty(len(sequences), dtype=torch.long)
    for row, seq in enumerate(sequences):
        penalties, warpers = seq.processors
        scores = logits[row:row + 1]
        if seq.grammar is not None:
            scores = seq.grammar.masked(scores)
        if penalties:  # only the penalty reads the history; the warpers take input_ids unused
            scores = penalties(torch.tensor([seq.prompt_ids + seq.token_ids], dtype=torch.long), scores.clone())
        if seq.sampling:
            warped = warpers(None, scores.clone())
            probs = torch.softmax(warped, dim=-1)
        if not seq.sampling or not bool(torch.isfinite(probs).all()):
            # (sampled) a temperature or penalty near 0 (allowed: > 0) overflows float32 to inf, and multinomial
            # would raise on the driver only; that distribution's limit is its argmax (temperature keeps the order)
            chosen[row] = int(torch.argmax(scores))
            drawn_from = scores
        else:
            chosen[row] = int(torch.multinomial(probs[0], 1, generator=seq.generator))
            drawn_from = warped
        if seq.params.logprobs is not None and seq.finish_reason is None:
            seq.logprobs.append(_token_logprob(drawn_from[0], int(chosen[row]), seq.params.logprobs))
        if seq.grammar is not None and seq.finish_reason is None:
            seq.grammar.accept(int(chosen[row]))
    return chosen


def _token_logprob(scores: torch.Tensor, token: int, alternatives: int) -> TokenLogprob:
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    top = torch.topk(logprobs, alternatives) if alternatives else None
    return (token, float(logprobs[token]),
            [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)])


class _GeneratedTokenPenalties:
    """OpenAI's presence and frequency penalties, which count the generated tokens only (transformers has no
    processor for them): a token's logit loses `presence` once it appeared and `frequency` per appearance."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[0, self.prompt_length:]
        if not generated.numel():
            return scores
        counts = torch.bincount(generated, minlength=scores.shape[-1])[:scores.shape[-1]].to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _processors(params: SamplingParams, prompt_length: int) -> Tuple[Any, Any]:
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    penalties = LogitsProcessorList()
    if params.logit_bias:
        penalties.append(SequenceBiasLogitsProcessor([[[token], bias] for token, bias in params.logit_bias.items()]))
    if params.repetition_penalty != 1.0:
        penalties.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        penalties.append(_GeneratedTokenPenalties(prompt_length, params.presence_penalty, params.frequency_penalty))
    warpers = LogitsProcessorList()
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return penalties, warpers


def new_sequence(prompt_ids: Sequence[int], params: SamplingParams, default_seed: int,
                 grammars: Optional[Grammars] = None) -> _Sequence:
    """A sequence to generate, with its own generator (its seed, or `default_seed`) and, where its parameters
    carry a grammar, its own matcher from `grammars`."""
    generator = torch.Generator().manual_seed(params.seed if params.seed is not None else default_seed)
    grammar = None
    if params.grammar is not None:
        if grammars is None:
            raise ValueError("a request with a grammar needs the model's Grammars")
        grammar = grammars.row(params.grammar)
    return _Sequence(list(prompt_ids), params, generator, grammar=grammar)


def pad_token_id(tokenizer: Any, eos_ids: Sequence[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)


def left_padded(prompts: Sequence[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids of prompts padded on the left to one width."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0)


def next_tokens(model: StepModel, logits: Optional[torch.Tensor], sequences: Sequence[_Sequence]) -> torch.Tensor:
    """Each row's next token, chosen where the model samples and shared with every rank that runs the loop."""
    failure: Optional[Exception] = None
    tokens = torch.zeros(len(sequences), dtype=torch.long)
    if model.samples_here:
        try:
            tokens = choose_tokens(logits.cpu(), sequences)  # each row's generator is a CPU one
        except Exception as error:  # noqa: BLE001 - re-raised below, after the peers were told
            # the other ranks already wait in share_tokens: send them -1 so that they fail this batch too
            # instead of waiting for tokens that never come (and pairing later collectives wrongly)
            failure, tokens = error, torch.full((len(sequences),), -1, dtype=torch.long)
    tokens = model.share_tokens(tokens)
    if failure is not None:
        raise InStepError(f"choosing the next tokens failed: {type(failure).__name__}: {failure}") from failure
    if bool((tokens < 0).any()):
        raise InStepError("the driver rank failed while choosing the next tokens; see its log")
    return tokens


def _decode_new(seq: _Sequence, tokenizer: Any, flush: bool) -> None:
    """Extend seq.text by the new tokens' text; text ending in an incomplete UTF-8 character waits for the token
    that completes it, unless `flush` (the sequence ends: then it is decoded as a whole decode would show it).
    A fast tokenizer's Rust side does this itself (tokenizers' DecodeStream); for the others, a short window is
    decoded instead of the whole sequence (decoding all of it at every token is quadratic). The window starts
    one token back, so that tokenizers which drop a leading space at a sequence's start (sentencepiece) decode the
    new text as part of the whole."""
    ids = seq.token_ids
    backend = getattr(tokenizer, "_tokenizer", None)
    # decode() cleans up spaces after the Rust decoder where the tokenizer asks for it; the stream does not
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        if seq.decoder is None:
            from tokenizers.decoders import DecodeStream

            seq.decoder = DecodeStream(skip_special_tokens=True)
        for token in ids[seq.prefix_offset:]:
            chunk = seq.decoder.step(backend, token)
            if chunk is not None:
                seq.text += chunk
                seq.read_offset = seq.prefix_offset + 1
            seq.prefix_offset += 1
        if flush and seq.read_offset < len(ids):
            seq.text += tokenizer.decode(ids[seq.read_offset:], skip_special_tokens=True)
            seq.read_offset = len(ids)
        return
    before = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
    window = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
    if (len(window) > len(before) and not window.endswith("\ufffd")) or flush:
        seq.text += window[len(before):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


def advance(seq: _Sequence, token: int, tokenizer: Any, eos: set, now: float, row: int,
             on_text: Optional[StreamCallback]) -> None:
    if seq.first_token_at is None:
        seq.first_token_at = now
    if token in eos:
        seq.finish_reason = "eos_token"
        if len(seq.logprobs) > len(seq.token_ids):  # an end of sequence is no token of the answer (TGI sends it)
            seq.end_logprob = seq.logprobs.pop(len(seq.token_ids))
        del seq.logprobs[len(seq.token_ids):]
    else:
        seq.token_ids.append(token)
        _decode_new(seq, tokenizer, flush=len(seq.token_ids) >= seq.params.max_new_tokens)
        span = stop_span(seq.text, seq.params.stop)
        if span is not None:
            seq.text = seq.text[:span[1] if seq.params.include_stop else span[0]]
            seq.finish_reason = "stop_sequence"
        elif len(seq.token_ids) >= seq.params.max_new_tokens:
            seq.finish_reason = "length"
    if seq.finish_reason == "eos_token":
        _decode_new(seq, tokenizer, flush=True)
    if on_text is not None:
        # hold back an incomplete UTF-8 character until the next token completes it, and text that may begin a
        # stop string which the answer will leave out
        ready = seq.text if seq.finish_reason else seq.text.rstrip("\ufffd")
        if not seq.finish_reason and seq.params.stop and not seq.params.include_stop:
            ready = ready[:max(0, len(ready) - max(len(stop) for stop in seq.params.stop) + 1)]
        if ready.startswith(seq.emitted) and (len(ready) > len(seq.emitted) or seq.finish_reason):
            on_text(row, ready[len(seq.emitted):], seq.finish_reason is not None)
            seq.emitted = ready
        elif seq.finish_reason:
            on_text(row, "", True)
