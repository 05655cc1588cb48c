"""handler.compile_step on a real tiny Llama: the step loop over the compiled forward (compiled at load, one graph
for every step shape) gives single-process greedy tokens and compiles nothing more while it serves; a compile that
fails, or whose logits differ from the eager forward's, leaves the model eager and says so."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from _llm import PROMPTS
from ts_plugin.continuous import ContinuousBatch
from ts_plugin.engines.base import HFStepModel
from ts_plugin.kv_blocks import KVBlocks
from ts_plugin.requests import SamplingParams
from ts_plugin.step_loop import StepLoop

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("compiled") / "llama")
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def reference(hf, ids, max_new_tokens):
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    return out[0, len(ids):].tolist()


def serve(step_model, tokenizer, requests):
    """Hand `requests` (id, prompt ids, new tokens) to a step loop one call apart; return the tokens of each."""
    loop = StepLoop(ContinuousBatch(step_model, tokenizer, [], 0, KVBlocks(256)))
    results = {}
    try:
        for row_id, ids, count in requests:
            results.update({key: out.result for key, out in loop.exchange([(row_id, ids, SamplingParams(count))],
                                                                            []).items() if out.result})
        while len(results) < len(requests):
            results.update({key: out.result for key, out in loop.exchange([], []).items() if out.result})
    finally:
        loop.close()
    return {row_id: result.token_ids for row_id, result in results.items()}


@pytest.mark.parametrize("guards", ["checked", "skipped"])
def test_compiled_steps_give_greedy_tokens_and_compile_nothing_after_the_load(tiny, guards, monkeypatch):
    """Served, the warm-up's graph runs with its guards skipped; checked here, they must hold for every step."""
    hf, tokenizer = tiny
    messages = []
    step_model = HFStepModel(hf, CPU, compile_step=True, progress=messages.append)
    assert messages[-1] == "handler.compile_step: the step runs compiled", messages  # guards skipped when served
    if guards == "checked":
        set_stance = torch.compiler.set_stance
        monkeypatch.setattr(torch.compiler, "set_stance", lambda **_: set_stance("default"))
    graphs = counters["stats"]["unique_graphs"]
    # rows join at different steps: prefills of several lengths, one row alone, several decoding together
    requests = [(f"r{i}", tokenizer(prompt)["input_ids"], count) for i, (prompt, count)
                in enumerate(zip(PROMPTS, (12, 5, 9)))]
    tokens = serve(step_model, tokenizer, requests)
    for row_id, ids, count in requests:
        assert tokens[row_id] == reference(hf, ids, count)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_compile_that_fails_leaves_the_step_eager_and_says_so(tiny, monkeypatch):
    hf, tokenizer = tiny

    def broken(*args, **kwargs):
        raise RuntimeError("inductor found no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda model, **options: broken)
    messages = []
    step_model = HFStepModel(hf, CPU, compile_step=True, progress=messages.append)
    assert step_model._compiled is None
    assert [m for m in messages if "runs eagerly" in m and "no C++ compiler" in m], messages
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert serve(step_model, tokenizer, [("a", ids, 6)])["a"] == reference(hf, ids, 6)


def test_compiled_logits_that_differ_leave_the_step_eager(tiny, monkeypatch):
    hf, tokenizer = tiny

    def off_by_a_little(model, **options):
        def forward(**inputs):
            out = model(**inputs)
            out.logits = out.logits + 0.5
            return out
        return forward

    monkeypatch.setattr(torch, "compile", off_by_a_little)
    messages = []
    assert HFStepModel(hf, CPU, compile_step=True, progress=messages.append)._compiled is None
    assert [m for m in messages if "runs eagerly" in m and "differ" in m], messages
