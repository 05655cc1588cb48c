"""Prefix caching in-process: which registered blocks match and which are evicted (ts_plugin.kv_blocks), and the
step loop with a real tiny model, where a prompt that starts with registered blocks reads them in place, computes
only the rest and still gives the tokens of single-process generate."""
from __future__ import annotations

import pytest
import torch

from ts_plugin.continuous import ContinuousBatch, generate
from ts_plugin.engines.base import HFStepModel
from ts_plugin.kv_blocks import KVBlocks
from ts_plugin.requests import SamplingParams


def _matched(kv, ids):
    table = kv.match(ids)
    kv.free(table)
    return table


def test_only_whole_blocks_after_the_same_prefix_match_and_the_last_token_is_left_to_compute():
    kv = KVBlocks(blocks=8, block_size=4, cached_blocks=16)
    prompt = list(range(12))
    assert _matched(kv, prompt) == []
    table = kv.allocate(3)
    kv.register(table, prompt)
    assert _matched(kv, prompt) == table[:2]  # 12 tokens: the third block would leave none to compute
    assert _matched(kv, prompt + [99]) == table
    assert _matched(kv, prompt[:6]) == table[:1]
    assert _matched(kv, [0, 1, 2, 3, 9, 5, 6, 7, 8]) == table[:1]  # the second block differs
    assert _matched(kv, [4, 5, 6, 7, 0, 1, 2, 3, 8]) == []  # the same tokens after another prefix
    hit = kv.match(prompt + [99])
    assert hit == table and kv.used == 3  # a hit holds the same blocks: nothing is copied
    kv.free(table)
    kv.free(hit)
    assert kv.used == 0 and kv.available == 8  # registered blocks no row holds can still be handed out


def test_the_least_recently_used_blocks_go_first_and_a_prefix_outlives_its_extensions():
    kv = KVBlocks(blocks=4, block_size=4, cached_blocks=4)
    shared = [1, 1, 1, 1]
    first = kv.allocate(3)
    kv.register(first, shared + [2, 2, 2, 2] + [3, 3, 3, 3])
    kv.free(first)
    second = kv.match(shared + [5, 5, 5, 5, 6, 6, 6, 6, 0])
    assert second == first[:1]
    second += kv.allocate(2)  # the free block, then the first prompt's last block (its least recently used)
    assert first[2] in second
    kv.register(second, shared + [5, 5, 5, 5] + [6, 6, 6, 6])
    kv.free(second)
    assert _matched(kv, shared + [2, 2, 2, 2, 0]) == first[:2]
    assert _matched(kv, shared + [5, 5, 5, 5, 6, 6, 6, 6, 0]) == second


def test_registered_blocks_beyond_the_prefix_cache_budget_are_freed_least_recently_used_first():
    kv = KVBlocks(blocks=8, block_size=4, cached_blocks=2)
    table = kv.allocate(4)
    kv.register(table, list(range(16)))  # 4 blocks held by a row: kept while it runs
    kv.free(table)  # then only 2 stay registered: the prefix's first blocks
    assert _matched(kv, list(range(17))) == table[:2] and kv.available == 8


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
    """An HFStepModel that records the tokens each forward computes."""
    step_model = HFStepModel(hf, torch.device("cpu"))
    computed = []
    forward = step_model.forward

    def recording(ids, batch):
        computed.append(ids.numel())
        return forward(ids, batch)

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
    kv = KVBlocks(256, cached_blocks=256)
    batch = ContinuousBatch(step_model, tokenizer, [tokenizer.eos_token_id], 0, kv, max_batched_tokens=budget)
    first = tokenizer(SHARED + "What is the capital of France?")["input_ids"]
    second = tokenizer(SHARED + "Name a prime number.")["input_ids"]
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 32
    result = run_alone(batch, "first", first, 6)
    decodes = len(result.token_ids) - 1
    assert result.cached_tokens == 0 and sum(computed) == len(first) + decodes
    assert result.token_ids == reference(hf, first, 6)
    computed.clear()
    result = run_alone(batch, "second", second, 6)
    assert result.cached_tokens == shared // 16 * 16 > 0
    assert sum(computed) == len(second) - result.cached_tokens + len(result.token_ids) - 1
    assert result.token_ids == reference(hf, second, 6)
    computed.clear()
    result = run_alone(batch, "again", first, 6)  # the whole prompt but its last token's block
    assert result.cached_tokens == (len(first) - 1) // 16 * 16
    assert sum(computed) == len(first) - result.cached_tokens + len(result.token_ids) - 1
    assert result.token_ids == reference(hf, first, 6)
    assert kv.used == 0


@pytest.mark.parametrize("budget", [None, 32])
def test_hits_beside_running_rows_and_evictions_keep_every_answer_exact(model, budget):
    """A small prefix budget: prompts evict each other's blocks while others hit, and rows of a static batch share
    blocks with each other's earlier prompts; registered blocks no row holds never exceed the budget."""
    hf, tokenizer = model
    step_model, _ = recording_model(hf)
    kv = KVBlocks(64, cached_blocks=6)
    questions = ["Why is the sky blue?", "Count to five.", "Who wrote Hamlet?", "What is two plus two?"]
    prompts = [tokenizer(SHARED + q)["input_ids"] for q in questions] + [tokenizer(q * 8)["input_ids"]
                                                                        for q in questions[:2]]
    cached = []
    for round_ in range(2):
        results = generate(step_model, tokenizer, prompts, [SamplingParams(5)] * len(prompts), 0,
                           [tokenizer.eos_token_id], max_batched_tokens=budget, kv=kv)
        assert [r.token_ids for r in results] == [reference(hf, ids, 5) for ids in prompts], round_
        cached.append([r.cached_tokens for r in results])
        assert kv.used == 0 and kv.blocks - kv.available <= 0 and len(kv._key_of) <= 6
    assert sum(cached[1]) > 0


def test_a_cancelled_hit_gives_its_blocks_back(model):
    hf, tokenizer = model
    kv = KVBlocks(256, cached_blocks=256)
    batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0, kv,
                            max_batched_tokens=16)
    prompt = tokenizer(SHARED * 2)["input_ids"]
    run_alone(batch, "first", prompt, 2)
    batch.step([("running", prompt[:10], SamplingParams(30))])
    held = kv.used
    batch.step([("hit", prompt + prompt[:40], SamplingParams(3))])  # a hit, then a chunk of 16 a step
    hit = next(row for row in batch.running if row.request_id == "hit")
    assert hit.cached_tokens > 0 and hit.left > 0 and kv.used > held
    batch.cancel(["hit"])
    assert kv.used == held and "hit" not in batch
