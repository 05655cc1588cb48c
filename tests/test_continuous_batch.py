"""ts_plugin.continuous in-process, on real tiny transformers models: rows that join a running batch at any step,
leave when they finish or are cancelled, and give the tokens of single-process generate (greedy) or of the same
request alone (seeded sampling)."""
from __future__ import annotations

import pytest
import torch

from _llm import PROMPTS
from ts_plugin.continuous import ContinuousBatch, generate
from ts_plugin.engines.base import HFStepModel, cache_layers
from ts_plugin.requests import SamplingParams


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
    results, widths = {}, []
    for step in range(steps):
        for request_id, output in batch.step(schedule.get(step, [])).items():
            if output.result is not None:
                results[request_id] = output.result
        if batch.mask is not None:
            widths.append((len(batch), batch.mask.shape[1], [layer.keys.shape for layer in cache_layers(batch.cache)]))
    return results, widths


def test_rows_joining_and_leaving_give_single_process_greedy_tokens(model):
    hf, tokenizer = model
    batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    lengths = [14, 3, 6]
    schedule = {0: [("long", prompts[0], SamplingParams(lengths[0]))],
                3: [("short", prompts[1], SamplingParams(lengths[1])), ("mid", prompts[2], SamplingParams(lengths[2]))],
                5: [("late", prompts[1], SamplingParams(4))]}
    results, widths = run(batch, schedule, 20)
    assert results["long"].token_ids == reference(hf, prompts[0], lengths[0])
    assert results["short"].token_ids == reference(hf, prompts[1], lengths[1])
    assert results["mid"].token_ids == reference(hf, prompts[2], lengths[2])
    assert results["late"].token_ids == reference(hf, prompts[1], 4)
    assert len(batch) == 0 and batch.cache is None  # every row left; the cache was released
    for rows, width, shapes in widths:  # the cache always has one row and one position per mask entry
        assert all(shape[0] == rows and shape[-2] == width for shape in shapes)
    assert max(rows for rows, _, _ in widths) == 3


def test_padding_no_row_needs_any_more_is_cropped(model):
    hf, tokenizer = model
    batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0)
    long_prompt, short_prompt = tokenizer(PROMPTS[1])["input_ids"], tokenizer(PROMPTS[2])["input_ids"]
    batch.step([("long", long_prompt, SamplingParams(2)), ("short", short_prompt, SamplingParams(6))])
    wide = batch.mask.shape[1]
    results, _ = run(batch, {}, 2)
    assert "long" in results and len(batch) == 1
    # only the short row is left: the long prompt's padding in front of it is gone
    assert batch.mask.shape[1] < wide and bool(batch.mask[:, 0].all())
    results, _ = run(batch, {}, 6)
    assert results["short"].token_ids == reference(hf, short_prompt, 6)


def test_a_seeded_sampled_request_gives_its_tokens_alone_or_beside_others(model):
    hf, tokenizer = model
    sampled = SamplingParams(10, do_sample=True, temperature=1.5, top_k=50, seed=1234)
    prompt = tokenizer(PROMPTS[0])["input_ids"]

    def tokens(schedule):
        batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0)
        return run(batch, schedule, 16)[0]["seeded"].token_ids

    alone = tokens({0: [("seeded", prompt, sampled)]})
    others = [("a", tokenizer(PROMPTS[1])["input_ids"], SamplingParams(3, do_sample=True)),
              ("b", tokenizer(PROMPTS[2])["input_ids"], SamplingParams(8, temperature=0.7, do_sample=True))]
    assert tokens({0: others[:1], 2: [("seeded", prompt, sampled)], 4: others[1:]}) == alone
    assert tokens({0: [("seeded", prompt, sampled)] + others}) == alone


def test_a_cancelled_row_frees_its_place_and_the_others_stay_exact(model):
    hf, tokenizer = model
    batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    batch.step([("gone", prompts[1], SamplingParams(30)), ("kept", prompts[0], SamplingParams(12))])
    batch.step([])
    batch.cancel(["gone", "never-here"])
    assert len(batch) == 1 and all(layer.keys.shape[0] == 1 for layer in cache_layers(batch.cache))
    results, _ = run(batch, {}, 12)
    assert results["kept"].token_ids == reference(hf, prompts[0], 12)
    batch.cancel(["kept"])  # it finished and left: nothing to drop
    assert len(batch) == 0 and batch.cache is None


def test_caches_with_sliding_window_layers_are_refused(tmp_path):
    """Left padding would shift a sliding window: continuous batching refuses such a model at load."""
    from transformers import AutoConfig, DynamicCache

    from ts_plugin.engines.base import EngineError, check_row_editable
    from ts_plugin.testing import make_tiny_model

    check_row_editable(DynamicCache(config=AutoConfig.from_pretrained(make_tiny_model(tmp_path / "l", arch="llama"))))
    mistral = AutoConfig.from_pretrained(make_tiny_model(tmp_path / "m", arch="mistral"))
    with pytest.raises(EngineError, match="DynamicSlidingWindowLayer"):
        check_row_editable(DynamicCache(config=mistral))


def test_several_steps_per_call_join_their_text_and_stop_when_a_row_finishes(model):
    hf, tokenizer = model
    batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0)
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


def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_rows_decode(model):
    """max_batched_tokens 20 with one running row: the long prompt takes 19 tokens a step, the running row gets a
    token every step meanwhile, and both answers equal single-process greedy generate."""
    hf, tokenizer = model
    steps_model = HFStepModel(hf, torch.device("cpu"))
    prefills = []
    forward = steps_model.forward

    def recording(ids, mask, positions, cache):
        if ids.shape[1] > 1:
            prefills.append(ids.shape[1])
        return forward(ids, mask, positions, cache)

    steps_model.forward = recording
    batch = ContinuousBatch(steps_model, tokenizer, [tokenizer.eos_token_id], 0, max_batched_tokens=20)
    short, long = tokenizer(PROMPTS[0])["input_ids"], tokenizer(LONG_PROMPT)["input_ids"]
    chunks = -(-len(long) // 19)
    assert chunks >= 3 and len(reference(hf, short, 40)) > chunks + 2  # the running row outlasts the prefill
    batch.step([("running", short, SamplingParams(40))])
    running = batch.rows[0].seq
    for step in range(chunks):
        before = len(running.token_ids)
        output = batch.step([("long", long, SamplingParams(8))] if step == 0 else [])
        assert len(running.token_ids) == before + 1, step
        assert ("long" in [row.request_id for row in batch.rows]) == (step == chunks - 1), step
        if step < chunks - 1:
            assert output["long"].text == "" and output["long"].result is None
    assert prefills[1:] == [19] * (chunks - 1) + [len(long) - 19 * (chunks - 1)], prefills
    results, _ = run(batch, {}, 60)
    assert results["long"].token_ids == reference(hf, long, 8)
    assert results["running"].token_ids == reference(hf, short, 40)


def test_short_prompts_that_fit_the_budget_overtake_a_chunked_one_and_a_cancelled_chunk_is_released(model):
    hf, tokenizer = model
    ended = []
    steps_model = HFStepModel(hf, torch.device("cpu"))
    steps_model.end = lambda cache: ended.append(cache)
    batch = ContinuousBatch(steps_model, tokenizer, [tokenizer.eos_token_id], 0, max_batched_tokens=24)
    long, short = tokenizer(LONG_PROMPT)["input_ids"], tokenizer(PROMPTS[0])["input_ids"]
    batch.step([("long", long, SamplingParams(4)), ("short", short, SamplingParams(3))])
    assert [row.request_id for row in batch.rows] == ["short"]  # joined whole in the first step
    assert [pending.row.request_id for pending in batch.waiting] == ["long"] and batch.waiting[0].done > 0
    pending_cache = batch.waiting[0].cache
    batch.cancel(["long"])
    assert not batch.waiting and any(cache is pending_cache for cache in ended)
    results, _ = run(batch, {}, 5)
    assert results["short"].token_ids == reference(hf, short, 3)


def test_without_a_budget_every_prompt_joins_whole(model):
    hf, tokenizer = model
    batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0)
    long = tokenizer(LONG_PROMPT)["input_ids"]
    batch.step([("long", long, SamplingParams(3))])
    assert [row.request_id for row in batch.rows] == ["long"] and not batch.waiting


def test_a_static_batch_of_a_sliding_window_model_keeps_its_finished_rows_and_is_exact(tmp_path):
    """A sliding-window cache cannot drop rows: the batch keeps them, fed padding, and every answer is still that of
    single-process generate (tiny Mistral, window 4, prompts longer than it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from ts_plugin.continuous import generate
    from ts_plugin.engines.base import uneditable_layers
    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "mistral", arch="mistral")
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))
    assert uneditable_layers(DynamicCache(config=hf.config))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    lengths = [9, 2, 5]
    results = generate(HFStepModel(hf, torch.device("cpu")), tokenizer, prompts,
                       [SamplingParams(n) for n in lengths], 0, [tokenizer.eos_token_id], max_batched_tokens=16,
                       rows_editable=False)
    assert [r.token_ids for r in results] == [reference(hf, ids, n) for ids, n in zip(prompts, lengths)]


def _run_to_end(batch, joining, bound):
    """Step until every request finished, checking that the cache never holds more positions than `bound`."""
    results, first = {}, True
    while first or len(batch):
        for request_id, output in batch.step(joining if first else []).items():
            if output.result is not None:
                results[request_id] = output.result
        first = False
        for layer in cache_layers(batch.cache) if batch.cache is not None else []:
            held = layer.keys.shape[0] * layer.keys.shape[-2]
            held += sum(pending.done for pending in batch.waiting if pending.cache is not None)
            assert held <= bound, (held, bound)
    return results


@pytest.mark.parametrize("max_batched_tokens", [None, 24])
def test_a_small_kv_bound_makes_requests_wait_and_preempts_rows_and_every_answer_is_exact(model, max_batched_tokens):
    """Four requests in a cache that holds the longest alone: they join as room frees, the newest running row is preempted
    when the rows outgrow the bound, its prompt and tokens are prefilled again, and every answer equals
    single-process greedy generate."""
    hf, tokenizer = model
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS] + [tokenizer(LONG_PROMPT)["input_ids"]]
    new_tokens = 40
    bound = max(len(p) for p in prompts) + new_tokens
    batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0,
                            max_batched_tokens=max_batched_tokens, kv_tokens=bound)
    joining = [(f"r{i}", prompt, SamplingParams(new_tokens)) for i, prompt in enumerate(prompts)]
    results = _run_to_end(batch, joining, bound)
    assert batch.preemptions > 0
    for request_id, prompt, params in joining:
        assert results[request_id].token_ids == reference(hf, prompt, new_tokens), request_id
    assert batch.cache is None and batch.kv_usage() == (0, bound)


def test_a_request_that_can_never_fit_the_kv_bound_is_refused_before_it_changes_anything(model):
    hf, tokenizer = model
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0,
                            kv_tokens=len(prompt) + 8)
    batch.step([("fits", prompt, SamplingParams(8))])
    with pytest.raises(ValueError, match="needs"):
        batch.step([("too-big", prompt, SamplingParams(9))])
    assert "fits" in batch and "too-big" not in batch


def test_a_static_batch_under_a_small_kv_bound_gives_the_answers_of_an_unbounded_one(model):
    hf, tokenizer = model
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS] + [tokenizer(LONG_PROMPT)["input_ids"]]
    params = [SamplingParams(40)] * len(prompts)

    def answers(kv_tokens):
        results = generate(HFStepModel(hf, torch.device("cpu")), tokenizer, prompts, params, 0,
                           [tokenizer.eos_token_id], kv_tokens=kv_tokens)
        return [result.token_ids for result in results]

    assert answers(max(len(p) for p in prompts) + 40) == answers(None)


def test_an_answer_that_ends_with_eos_keeps_that_token_for_tgis_last_stream_event(model):
    """The end of sequence is no token of the answer (nor of OpenAI's logprobs), but TGI streams it last, with
    its id, logprob and special: true."""
    import json

    from ts_plugin.handlers._tgi import TGIFormat

    hf, tokenizer = model
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0)
    result = _run_to_end(batch, [("r", prompt, SamplingParams(40, logprobs=0))], bound=10**9)["r"]
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
