"""Prefix caching in-process: the index's choices (which blocks match, which are evicted) and the step loop with a
real tiny model, where a prompt that starts with cached blocks computes only the rest and still gives the tokens
of single-process generate."""
from __future__ import annotations

import pytest
import torch

from ts_plugin.continuous import ContinuousBatch, generate
from ts_plugin.engines.base import HFStepModel
from ts_plugin.prefix_cache import PrefixIndex
from ts_plugin.requests import SamplingParams


def test_only_whole_blocks_after_the_same_prefix_match_and_the_last_token_is_left_to_compute():
    index = PrefixIndex(capacity_tokens=64, block_size=4)
    prompt = list(range(12))
    assert index.match(prompt) == []
    new, evicted = index.insert(prompt)
    assert [at for _, at in new] == [0, 1, 2] and evicted == []
    ids = [block for block, _ in new]
    assert index.match(prompt) == ids[:2]  # 12 tokens: the third block would leave none to compute
    assert index.match(prompt + [99]) == ids
    assert index.match(prompt[:6]) == ids[:1]
    assert index.match([0, 1, 2, 3, 9, 5, 6, 7, 8]) == ids[:1]  # the second block differs
    assert index.match([4, 5, 6, 7, 0, 1, 2, 3, 8]) == []  # the same tokens after another prefix
    again, _ = index.insert(prompt + [1, 2, 3, 4])
    assert [at for _, at in again] == [3]  # only the new block is stored


def test_the_least_recently_used_blocks_go_first_and_a_prefix_outlives_its_extensions():
    index = PrefixIndex(capacity_tokens=16, block_size=4)  # 4 blocks
    shared = [1, 1, 1, 1]
    first, _ = index.insert(shared + [2, 2, 2, 2] + [3, 3, 3, 3])
    second, evicted = index.insert(shared + [5, 5, 5, 5] + [6, 6, 6, 6])
    # the shared block is kept; the first prompt's last block (its least recently used) made room
    assert evicted == [first[2][0]] and len(index) == 4
    assert index.match(shared + [2, 2, 2, 2, 0]) == [first[0][0], first[1][0]]
    assert index.match(shared + [5, 5, 5, 5, 6, 6, 6, 6, 0]) == [first[0][0]] + [block for block, _ in second]
    big, evicted = index.insert(list(range(40)))  # 10 blocks in a budget of 4: its first 4 are kept
    assert [at for _, at in big] == [0, 1, 2, 3] and len(evicted) == 4 and len(index) == 4


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("prefix") / request.param, arch=request.param)
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def reference(hf, ids, max_new_tokens):
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    eos = hf.generation_config.eos_token_id
    return new[:new.index(eos)] if eos in new else new


SHARED = "You are a careful assistant. Answer in one short sentence, and say so when you do not know. " * 2


def recording_model(hf):
    """An HFStepModel that records the prompt tokens each prefill forward computes."""
    step_model = HFStepModel(hf, torch.device("cpu"))
    computed = []
    forward = step_model.forward

    def recording(ids, mask, positions, cache):
        if ids.shape[1] > 1:
            computed.append(int(ids.shape[0] * ids.shape[1]))
        return forward(ids, mask, positions, cache)

    step_model.forward = recording
    return step_model, computed


def run_alone(batch, request_id, prompt, tokens):
    out = batch.step([(request_id, prompt, SamplingParams(tokens))])
    while out[request_id].result is None:
        out = batch.step([])
    return out[request_id].result


@pytest.mark.parametrize("budget", [None, 24])
def test_a_prompt_that_starts_with_cached_blocks_computes_only_the_rest_and_gives_the_same_tokens(model, budget):
    hf, tokenizer = model
    step_model, computed = recording_model(hf)
    index = PrefixIndex(capacity_tokens=4096)
    batch = ContinuousBatch(step_model, tokenizer, [tokenizer.eos_token_id], 0, max_batched_tokens=budget,
                            prefix=index)
    first = tokenizer(SHARED + "What is the capital of France?")["input_ids"]
    second = tokenizer(SHARED + "Name a prime number.")["input_ids"]
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 32
    result = run_alone(batch, "first", first, 6)
    assert result.cached_tokens == 0 and sum(computed) == len(first)
    assert result.token_ids == reference(hf, first, 6)
    computed.clear()
    result = run_alone(batch, "second", second, 6)
    assert result.cached_tokens == shared // 16 * 16 > 0
    assert sum(computed) == len(second) - result.cached_tokens
    assert result.token_ids == reference(hf, second, 6)
    computed.clear()
    result = run_alone(batch, "again", first, 6)  # the whole prompt but its last token's block
    assert result.cached_tokens == (len(first) - 1) // 16 * 16 and sum(computed) == len(first) - result.cached_tokens
    assert result.token_ids == reference(hf, first, 6)
    assert set(step_model.prefix_store.blocks) == {block for block in index._blocks.values()}


@pytest.mark.parametrize("budget", [None, 32])
def test_hits_beside_running_rows_and_evictions_keep_every_answer_exact(model, budget):
    """A small budget: prompts evict each other's blocks while others hit, and rows of a static batch share
    blocks with each other's earlier prompts; the store never holds more blocks than the index."""
    hf, tokenizer = model
    step_model, _ = recording_model(hf)
    index = PrefixIndex(capacity_tokens=96)  # 6 blocks
    questions = ["Why is the sky blue?", "Count to five.", "Who wrote Hamlet?", "What is two plus two?"]
    prompts = [tokenizer(SHARED + q)["input_ids"] for q in questions] + [tokenizer(q * 8)["input_ids"]
                                                                        for q in questions[:2]]
    cached = []
    for round_ in range(2):
        results = generate(step_model, tokenizer, prompts, [SamplingParams(5)] * len(prompts), 0,
                           [tokenizer.eos_token_id], max_batched_tokens=budget, prefix=index)
        assert [r.token_ids for r in results] == [reference(hf, ids, 5) for ids in prompts], round_
        cached.append([r.cached_tokens for r in results])
        assert len(step_model.prefix_store.blocks) == len(index) <= 6
    assert sum(cached[1]) > 0


def test_a_cancelled_hit_releases_its_cache(model):
    hf, tokenizer = model
    ended = []
    step_model = HFStepModel(hf, torch.device("cpu"))
    step_model.end = ended.append
    batch = ContinuousBatch(step_model, tokenizer, [tokenizer.eos_token_id], 0, max_batched_tokens=16,
                            prefix=PrefixIndex(capacity_tokens=4096))
    prompt = tokenizer(SHARED * 2)["input_ids"]
    run_alone(batch, "first", prompt, 2)
    batch.step([("running", prompt[:10], SamplingParams(30))])
    batch.step([("hit", prompt + prompt[:40], SamplingParams(3))])  # a hit, then a chunk of 16 a step
    pending = next(p for p in batch.waiting if p.row.request_id == "hit")
    assert pending.row.cached_tokens > 0 and pending.cache is not None
    batch.cancel(["hit"])
    assert any(cache is pending.cache for cache in ended) and not batch.waiting
