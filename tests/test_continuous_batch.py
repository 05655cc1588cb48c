"""ts_plugin.continuous in-process, on real tiny transformers models: rows that join a running batch at any step,
leave when they finish or are cancelled, and give the tokens of single-process generate (greedy) or of the same
request alone (seeded sampling); the paged KV cache's blocks come and go with them."""
from __future__ import annotations

import pytest
import torch

from _llm import PROMPTS
from ts_plugin.continuous import ContinuousBatch, generate
from ts_plugin.engines.base import HFStepModel
from ts_plugin.kv_blocks import KVBlocks
from ts_plugin.requests import SamplingParams


def new_batch(hf, tokenizer, blocks=4096, **kwargs):
    return ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0,
                           KVBlocks(blocks), **kwargs)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("cb") / request.param, arch=request.param)
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return hf, AutoTokenizer.from_pretrained(str(path))


def reference(hf, ids, max_new_tokens):
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    eos = hf.generation_config.eos_token_id
    return new[:new.index(eos)] if eos in new else new


def run(batch, schedule, steps):
    """schedule: step -> [(request id, prompt ids, params)] joining then; returns request id -> result."""
    results, held = {}, []
    for step in range(steps):
        for request_id, output in batch.step(schedule.get(step, [])).items():
            if output.result is not None:
                results[request_id] = output.result
        held.append((len(batch.running), batch.kv.used, sum(-(-row.computed // 16) for row in batch.running)))
    return results, held


def test_rows_joining_and_leaving_give_single_process_greedy_tokens(model):
    hf, tokenizer = model
    batch = new_batch(hf, tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    lengths = [14, 3, 6]
    schedule = {0: [("long", prompts[0], SamplingParams(lengths[0]))],
                3: [("short", prompts[1], SamplingParams(lengths[1])), ("mid", prompts[2], SamplingParams(lengths[2]))],
                5: [("late", prompts[1], SamplingParams(4))]}
    results, held = run(batch, schedule, 20)
    assert results["long"].token_ids == reference(hf, prompts[0], lengths[0])
    assert results["short"].token_ids == reference(hf, prompts[1], lengths[1])
    assert results["mid"].token_ids == reference(hf, prompts[2], lengths[2])
    assert results["late"].token_ids == reference(hf, prompts[1], 4)
    assert len(batch) == 0 and batch.kv.used == 0  # every row left and gave its blocks back
    for rows, used, needed in held:  # no padding: the rows hold the blocks their own tokens fill, no more
        assert used <= needed + rows
    assert max(rows for rows, _, _ in held) == 3


def test_a_short_row_beside_a_long_one_holds_only_its_own_blocks(model):
    hf, tokenizer = model
    batch = new_batch(hf, tokenizer)
    long_prompt, short_prompt = tokenizer(LONG_PROMPT)["input_ids"], tokenizer(PROMPTS[1])["input_ids"]
    batch.step([("long", long_prompt, SamplingParams(2)), ("short", short_prompt, SamplingParams(6))])
    tables = {row.request_id: len(row.table) for row in batch.running}
    assert tables == {"long": -(-(len(long_prompt) + 1) // 16), "short": -(-(len(short_prompt) + 1) // 16)}
    results, _ = run(batch, {}, 7)
    assert results["short"].token_ids == reference(hf, short_prompt, 6)
    assert results["long"].token_ids == reference(hf, long_prompt, 2)


def test_a_seeded_sampled_request_gives_its_tokens_alone_or_beside_others(model):
    hf, tokenizer = model
    sampled = SamplingParams(10, do_sample=True, temperature=1.5, top_k=50, seed=1234)
    prompt = tokenizer(PROMPTS[0])["input_ids"]

    def tokens(schedule):
        batch = new_batch(hf, tokenizer)
        return run(batch, schedule, 16)[0]["seeded"].token_ids

    alone = tokens({0: [("seeded", prompt, sampled)]})
    others = [("a", tokenizer(PROMPTS[1])["input_ids"], SamplingParams(3, do_sample=True)),
              ("b", tokenizer(PROMPTS[2])["input_ids"], SamplingParams(8, temperature=0.7, do_sample=True))]
    assert tokens({0: others[:1], 2: [("seeded", prompt, sampled)], 4: others[1:]}) == alone
    assert tokens({0: [("seeded", prompt, sampled)] + others}) == alone


def test_a_cancelled_row_frees_its_place_and_the_others_stay_exact(model):
    hf, tokenizer = model
    batch = new_batch(hf, tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    batch.step([("gone", prompts[1], SamplingParams(30)), ("kept", prompts[0], SamplingParams(12))])
    batch.step([])
    kept_blocks = len(next(row.table for row in batch.running if row.request_id == "kept"))
    batch.cancel(["gone", "never-here"])
    assert len(batch) == 1 and batch.kv.used == kept_blocks
    results, _ = run(batch, {}, 12)
    assert results["kept"].token_ids == reference(hf, prompts[0], 12)
    batch.cancel(["kept"])  # it finished and left: nothing to drop
    assert len(batch) == 0 and batch.kv.used == 0


def test_rows_of_a_sliding_window_model_join_and_leave_and_stay_exact(tmp_path):
    """The window is the attention's mask over each row's own blocks, so rows join and leave a sliding-window model
    (tiny Mistral, window 4, prompts longer than it) as any other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "mistral", arch="mistral")
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    batch = new_batch(hf, tokenizer, max_batched_tokens=16)
    schedule = {0: [("a", prompts[0], SamplingParams(9))], 2: [("b", prompts[1], SamplingParams(2))],
                3: [("c", prompts[2], SamplingParams(5))]}
    results, _ = run(batch, schedule, 30)
    assert [results[name].token_ids for name in "abc"] == [reference(hf, prompts[0], 9), reference(hf, prompts[1], 2),
                                                           reference(hf, prompts[2], 5)]


def test_several_steps_per_call_join_their_text_and_stop_when_a_row_finishes(model):
    hf, tokenizer = model
    batch = new_batch(hf, tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    joining = [("long", prompts[0], SamplingParams(12)), ("short", prompts[1], SamplingParams(3))]
    calls, texts, results = 0, {"long": "", "short": ""}, {}
    while calls == 0 or len(batch):
        outputs = batch.steps(joining if calls == 0 else [], 4)
        calls += 1
        for request_id, output in outputs.items():
            texts[request_id] += output.text
            if output.result is not None:
                results[request_id] = output.result
        if calls == 1:  # "short" ended at its 3rd token: the call stops there, so a new request could join
            assert set(results) == {"short"} and len(results["short"].token_ids) == 3
    assert results["long"].token_ids == reference(hf, prompts[0], 12)
    assert results["short"].token_ids == reference(hf, prompts[1], 3)
    assert texts == {name: result.text for name, result in results.items()}
    assert calls == 4  # 3 steps, then 4 + 4 + the last 1 of the 12 tokens


LONG_PROMPT = "tokens flow through stages ; ranks agree on every step . " * 6


def test_a_long_prompt_is_prefilled_in_chunks_in_the_same_forward_as_the_running_rows(model):
    """max_batched_tokens 20 with one running row: each step is one forward of the running row's token and 19 of the
    long prompt's, and both answers equal single-process greedy generate."""
    hf, tokenizer = model
    steps_model = HFStepModel(hf, torch.device("cpu"))
    steps = []
    forward = steps_model.forward

    def recording(ids, batch):
        steps.append([row.new for row in batch.rows])
        return forward(ids, batch)

    steps_model.forward = recording
    batch = ContinuousBatch(steps_model, tokenizer, [tokenizer.eos_token_id], 0, KVBlocks(4096), max_batched_tokens=20)
    short, long = tokenizer(PROMPTS[0])["input_ids"], tokenizer(LONG_PROMPT)["input_ids"]
    chunks = -(-len(long) // 19)
    assert chunks >= 3 and len(reference(hf, short, 40)) > chunks + 2  # the running row outlasts the prefill
    batch.step([("running", short, SamplingParams(40))])
    running = batch.running[0].seq
    for step in range(chunks):
        before = len(running.token_ids)
        output = batch.step([("long", long, SamplingParams(8))] if step == 0 else [])
        assert len(running.token_ids) == before + 1, step
        if step < chunks - 1:
            assert output["long"].text == "" and output["long"].result is None
    assert steps[1:] == [[1, 19]] * (chunks - 1) + [[1, len(long) - 19 * (chunks - 1)]], steps
    results, _ = run(batch, {}, 60)
    assert results["long"].token_ids == reference(hf, long, 8)
    assert results["running"].token_ids == reference(hf, short, 40)


def test_short_prompts_that_fit_the_budget_overtake_a_chunked_one_and_a_cancelled_chunk_gives_its_blocks_back(model):
    hf, tokenizer = model
    batch = new_batch(hf, tokenizer, max_batched_tokens=24)
    long, short = tokenizer(LONG_PROMPT)["input_ids"], tokenizer(PROMPTS[0])["input_ids"]
    assert len(short) < 24 < len(long)
    batch.step([("long", long, SamplingParams(4)), ("short", short, SamplingParams(3))])
    prefilling = [row for row in batch.running if row.left > 1]
    assert [row.request_id for row in prefilling] == ["long"] and 0 < prefilling[0].computed < len(long)
    assert [row.request_id for row in batch.running if row.left == 1] == ["short"]  # it has its first token
    short_blocks = len(next(row.table for row in batch.running if row.request_id == "short"))
    batch.cancel(["long"])
    assert batch.kv.used == short_blocks
    results, _ = run(batch, {}, 5)
    assert results["short"].token_ids == reference(hf, short, 3)


def test_without_a_budget_every_prompt_joins_whole(model):
    hf, tokenizer = model
    batch = new_batch(hf, tokenizer)
    long = tokenizer(LONG_PROMPT)["input_ids"]
    batch.step([("long", long, SamplingParams(3))])
    assert [(row.request_id, row.left) for row in batch.running] == [("long", 1)] and not batch.waiting


def test_a_static_batch_of_a_sliding_window_model_is_exact(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "mistral", arch="mistral")
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    lengths = [9, 2, 5]
    results = generate(HFStepModel(hf, torch.device("cpu")), tokenizer, prompts,
                       [SamplingParams(n) for n in lengths], 0, [tokenizer.eos_token_id], max_batched_tokens=16)
    assert [r.token_ids for r in results] == [reference(hf, ids, n) for ids, n in zip(prompts, lengths)]


def _run_to_end(batch, joining):
    """Step until every request finished, checking that the pool never grows past the cache's blocks."""
    results, first = {}, True
    while first or len(batch):
        for request_id, output in batch.step(joining if first else []).items():
            if output.result is not None:
                results[request_id] = output.result
        first = False
        for keys, values in batch.model.pool.layers.values():
            assert keys.shape[1] <= batch.kv.blocks * batch.kv.block_size, keys.shape
    return results


@pytest.mark.parametrize("max_batched_tokens", [None, 24])
def test_a_small_kv_cache_makes_requests_wait_and_preempts_rows_and_every_answer_is_exact(model, max_batched_tokens):
    """Four requests in a cache that holds the longest alone: they join as blocks free, the newest running row is
    preempted when the rows outgrow the cache, its prompt and tokens are computed again, and every answer equals
    single-process greedy generate."""
    hf, tokenizer = model
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS] + [tokenizer(LONG_PROMPT)["input_ids"]]
    new_tokens = 40
    blocks = -(-(max(len(p) for p in prompts) + new_tokens) // 16)
    batch = new_batch(hf, tokenizer, blocks, max_batched_tokens=max_batched_tokens)
    joining = [(f"r{i}", prompt, SamplingParams(new_tokens)) for i, prompt in enumerate(prompts)]
    results = _run_to_end(batch, joining)
    assert batch.preemptions > 0
    for request_id, prompt, params in joining:
        assert results[request_id].token_ids == reference(hf, prompt, new_tokens), request_id
    assert batch.kv_usage() == (0, blocks * 16)


def test_a_request_that_can_never_fit_the_kv_cache_is_refused_before_it_changes_anything(model):
    hf, tokenizer = model
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    blocks = -(-(len(prompt) + 8) // 16)
    batch = new_batch(hf, tokenizer, blocks)
    batch.step([("fits", prompt, SamplingParams(8))])
    with pytest.raises(ValueError, match="needs"):
        batch.step([("too-big", prompt, SamplingParams(blocks * 16 - len(prompt) + 1))])
    assert "fits" in batch and "too-big" not in batch


def test_a_static_batch_in_a_small_kv_cache_gives_the_answers_of_an_unbounded_one(model):
    hf, tokenizer = model
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS] + [tokenizer(LONG_PROMPT)["input_ids"]]
    params = [SamplingParams(40)] * len(prompts)

    def answers(kv):
        results = generate(HFStepModel(hf, torch.device("cpu")), tokenizer, prompts, params, 0,
                           [tokenizer.eos_token_id], kv=kv)
        return [result.token_ids for result in results]

    assert answers(KVBlocks(-(-(max(len(p) for p in prompts) + 40) // 16))) == answers(None)


def test_an_answer_that_ends_with_eos_keeps_that_token_for_tgis_last_stream_event(model):
    """The end of sequence is no token of the answer (nor of OpenAI's logprobs), but TGI streams it last, with
    its id, logprob and special: true."""
    import json

    from ts_plugin.handlers._tgi import TGIFormat

    hf, tokenizer = model
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    batch = new_batch(hf, tokenizer)
    result = _run_to_end(batch, [("r", prompt, SamplingParams(40, logprobs=0))])["r"]
    if hf.config.model_type != "llama":  # the tiny gpt2 does not end this prompt within 40 tokens
        assert result.finish_reason == "length" and result.end_logprob is None
        return
    assert result.finish_reason == "eos_token" and result.token_ids == reference(hf, prompt, 40)
    assert len(result.logprobs) == len(result.token_ids) and tokenizer.eos_token_id not in result.token_ids
    eos_id, logprob, _ = result.end_logprob
    assert eos_id == tokenizer.eos_token_id and logprob <= 0
    tgi = TGIFormat(None, lambda request, res: {"generated_text": res.text}, tokenizer.all_special_ids)
    last = json.loads(tgi.event("", result, []).split("data: ")[-1])
    assert last["token"] == {"id": eos_id, "text": "", "logprob": logprob, "special": True}
    assert last["generated_text"] == result.text
