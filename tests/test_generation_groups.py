"""continuous.generate (a static batch through the one step loop) with a StepModel that splits a batch into row
groups (the pipeline engine): the groups step concurrently, and the answers are those of the batch generated
whole; plus sampling and incremental decoding."""
from __future__ import annotations

import threading

import pytest
import torch

from ts_plugin.continuous import generate
from ts_plugin.engines._paged import KVPool
from ts_plugin.engines.base import StepModel
from ts_plugin.kv_blocks import KVBlocks
from ts_plugin.requests import SamplingParams

VOCAB = 32


class _Tokenizer:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class _Counting(StepModel):
    """Logits that depend only on each row's own tokens, so grouping cannot change the answer. A row is known by
    its first block (no prefix cache: no two rows share one)."""

    samples_here = True

    def __init__(self, groups=None, meet_timeout: float = 0.0):
        self.groups = groups
        self.pool = KVPool(16)
        self.steps_by_thread = {}
        self.history = {}
        self._lock = threading.Lock()
        self._meet = threading.Barrier(len(groups), timeout=meet_timeout) if groups and meet_timeout else None

    def forward(self, input_ids, batch):
        if self._meet is not None and all(row.new == row.length for row in batch.rows):
            self._meet.wait()  # every group's first step must run at the same time, or this times out
        name = threading.current_thread().name
        self.steps_by_thread[name] = self.steps_by_thread.get(name, 0) + 1
        histories, at = [], 0
        for row in batch.rows:
            with self._lock:
                seen = self.history.get(row.blocks[0], [])[:row.length - row.new] + input_ids[at:at + row.new].tolist()
                self.history[row.blocks[0]] = seen
            histories.append(seen)
            at += row.new
        favourite = torch.tensor([(sum(seen) * 7 + len(seen)) % (VOCAB - 2) + 2 for seen in histories])
        logits = torch.linspace(0, 1, VOCAB).repeat(len(histories), 1)  # a spread for the sampled rows
        logits[torch.arange(len(histories)), favourite] += 2.0
        logits[:, :2] = -1e9  # pad and eos: every row runs to its max_new_tokens
        return logits

    def share_tokens(self, tokens):
        return tokens


class _Grouped(_Counting):
    def row_groups(self, rows):
        return self.groups


PROMPTS = [[3, 4, 5], [6], [7, 8], [9, 10, 11, 12], [13, 14]]
PARAMS = [SamplingParams(5), SamplingParams(3, do_sample=True), SamplingParams(6, temperature=3.0, top_k=16),
          SamplingParams(4, do_sample=True, seed=11), SamplingParams(6, temperature=3.0)]


def test_groups_give_the_answers_of_the_whole_batch_in_row_order():
    whole = generate(_Counting(), _Tokenizer(), PROMPTS, PARAMS, 100, [1])
    streamed = []
    model = _Grouped([range(0, 2), range(2, 4), range(4, 5)], meet_timeout=30)
    kv = KVBlocks(64)
    grouped = generate(model, _Tokenizer(), PROMPTS, PARAMS, 100, [1], kv=kv,
                       on_step=lambda row, output: streamed.append((row, output.text, output.result is not None)))
    # the same tokens per row: unseeded sampled rows keep `default_seed + row` of the whole batch
    assert [r.token_ids for r in grouped] == [r.token_ids for r in whole]
    assert [r.finish_reason for r in grouped] == [r.finish_reason for r in whole]
    assert [len(r.token_ids) for r in grouped] == [p.max_new_tokens for p in PARAMS]
    # each group stepped in a thread of its own, and every row gave its blocks back
    assert len(model.steps_by_thread) == 3 and kv.used == 0
    # streamed text arrives under the batch's row numbers
    for row, result in enumerate(whole):
        assert "".join(text for r, text, _ in streamed if r == row) == result.text
        assert [finished for r, _, finished in streamed if r == row][-1] is True


def test_a_failing_group_fails_the_batch_and_every_block_is_released():
    class Failing(_Grouped):
        def forward(self, input_ids, batch):
            if any(row.length >= 7 for row in batch.rows):  # group 0's fourth decode step; group 1's row is done
                raise RuntimeError("stage failed")
            return super().forward(input_ids, batch)

    model = Failing([range(0, 2), range(2, 3)])
    kv = KVBlocks(64)
    with pytest.raises(RuntimeError, match="stage failed"):
        generate(model, _Tokenizer(), [[3, 4, 5], [6], [7, 8]], [SamplingParams(6), SamplingParams(6),
                                                                  SamplingParams(2)], 0, [1], kv=kv)
    assert kv.used == 0  # group 1's row gave its blocks back when it finished, group 0's when the step failed


def test_sampling_uses_transformers_processors_per_row():
    """Each row's filters are transformers' own: samples stay in HF's top-k / top-p sets, the penalty moves the
    greedy choice as RepetitionPenaltyLogitsProcessor does, and rows do not share parameters or generators."""
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    from ts_plugin.generation import choose_tokens, new_sequence

    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB) * 3
    top3 = set(TopKLogitsWarper(3)(None, logits.clone()).isfinite().nonzero()[:, 1].tolist())
    nucleus = set(TopPLogitsWarper(0.6)(None, logits.clone()).isfinite().nonzero()[:, 1].tolist())
    rows = [new_sequence([1, 2], SamplingParams(1, do_sample=True, top_k=3), seed) for seed in range(40)]
    rows += [new_sequence([1, 2], SamplingParams(1, do_sample=True, top_p=0.6), seed) for seed in range(40)]
    chosen = choose_tokens(logits.repeat(len(rows), 1), rows).tolist()
    assert set(chosen[:40]) <= top3 and len(set(chosen[:40])) > 1
    assert set(chosen[40:]) <= nucleus
    favourite = int(logits.argmax())
    penalized = new_sequence([favourite], SamplingParams(1, repetition_penalty=50.0), 0)
    expected = int(RepetitionPenaltyLogitsProcessor(50.0)(torch.tensor([[favourite]]), logits.clone()).argmax())
    assert expected != favourite
    assert choose_tokens(logits, [penalized]).tolist() == [expected]


class _DecodeOnly:
    """A tokenizer without a Rust side (as a slow one): only decode."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


@pytest.mark.parametrize("fast", [True, False], ids=["decode-stream", "window"])
def test_incremental_decoding_gives_the_text_of_the_whole_sequence(tmp_path, fast):
    """seq.text is built token by token (tokenizers' DecodeStream on a fast tokenizer, short windows otherwise),
    not by decoding everything at every token: it must still equal the whole sequence's decoding, split UTF-8
    characters and all (random ids from a byte-level vocabulary)."""
    import random

    from ts_plugin.generation import advance, new_sequence
    from ts_plugin.testing import make_tokenizer

    tokenizer = make_tokenizer(tmp_path)
    assert hasattr(tokenizer, "_tokenizer")
    vocab = len(tokenizer)
    tokenizer = tokenizer if fast else _DecodeOnly(tokenizer)
    rng = random.Random(1)
    for trial in range(30):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))]
        seq = new_sequence([1], SamplingParams(len(ids)), 0)
        streamed = []
        for token in ids:
            advance(seq, token, tokenizer, {2}, 0.0, 0, lambda row, text, done: streamed.append(text))
        assert seq.text == tokenizer.decode(ids, skip_special_tokens=True), (trial, ids)
        assert "".join(streamed) == seq.text
        assert seq.finish_reason == "length"


def test_openai_penalties_count_generated_tokens_and_logit_bias_adds_to_the_logit():
    from ts_plugin.generation import choose_tokens, new_sequence

    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6] = 3.0, 2.0
    # 5 is in the prompt only: presence and frequency leave it alone
    assert choose_tokens(logits, [new_sequence([5], SamplingParams(4, presence_penalty=2.0), 0)]).tolist() == [5]
    generated_once = new_sequence([1], SamplingParams(4, presence_penalty=1.5), 0)
    generated_once.token_ids = [5]
    assert choose_tokens(logits, [generated_once]).tolist() == [6]  # 3 - 1.5 < 2
    frequent = new_sequence([1], SamplingParams(4, frequency_penalty=0.6), 0)
    frequent.token_ids = [5]
    assert choose_tokens(logits, [frequent]).tolist() == [5]  # 3 - 0.6 > 2
    frequent.token_ids = [5, 5]
    assert choose_tokens(logits, [frequent]).tolist() == [6]  # 3 - 1.2 < 2
    biased = new_sequence([1], SamplingParams(4, logit_bias={9: 100.0, 5: -100.0}), 0)
    assert choose_tokens(logits, [biased]).tolist() == [9]


@pytest.mark.parametrize("include_stop", [True, False])
def test_a_stop_string_ends_the_text_or_is_left_out_and_a_stream_never_sends_a_piece_of_it(tmp_path, include_stop):
    from ts_plugin.generation import advance, new_sequence
    from ts_plugin.testing import make_tokenizer

    tokenizer = make_tokenizer(tmp_path)
    ids = tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    seq = new_sequence([1], SamplingParams(len(ids), stop=["over the", "zzz"], include_stop=include_stop), 0)
    streamed = []
    for token in ids:
        advance(seq, token, tokenizer, {2}, 0.0, 0, lambda row, text, done: streamed.append(text))
        if seq.finish_reason:
            break
    expected = "the quick brown fox jumps over the" if include_stop else "the quick brown fox jumps "
    assert (seq.text, seq.finish_reason) == (expected, "stop_sequence")
    assert "".join(streamed) == expected


def test_logprobs_come_from_the_distribution_the_token_was_drawn_from():
    from transformers import TopKLogitsWarper

    from ts_plugin.generation import advance, choose_tokens, new_sequence

    torch.manual_seed(1)
    logits = torch.randn(1, VOCAB) * 3
    greedy = new_sequence([1], SamplingParams(4, logprobs=3), 0)
    sampled = new_sequence([1], SamplingParams(4, do_sample=True, top_k=2, logprobs=3), 5)
    plain = new_sequence([1], SamplingParams(4), 0)
    chosen = choose_tokens(logits.repeat(3, 1), [greedy, sampled, plain]).tolist()
    raw = torch.log_softmax(logits[0], -1)
    token, logprob, top = greedy.logprobs[0]
    assert token == chosen[0] == int(raw.argmax()) and logprob == pytest.approx(float(raw.max()))
    assert [t for t, _ in top] == raw.topk(3).indices.tolist()
    warped = torch.log_softmax(TopKLogitsWarper(2)(None, logits.clone())[0], -1)  # two tokens share the mass
    token, logprob, top = sampled.logprobs[0]
    assert logprob == pytest.approx(float(warped[chosen[1]])) and top[2][1] == float("-inf")
    assert plain.logprobs == []
    advance(greedy, 2, _Tokenizer(), {2}, 0.0, 0, None)  # the end of sequence is no token of the answer
    assert greedy.logprobs == [] and greedy.finish_reason == "eos_token"
