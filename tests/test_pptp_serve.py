"""parallelType pptp through the real TorchServe: torchrun with 4 ranks = 2 stages x 2 tensor-parallel ranks."""
from __future__ import annotations

import pytest

from _llm import PROMPTS, REPO, greedy_bodies, predict_concurrently, reference_text, stream_text, tiny_llama_and_store
from ts_plugin.testing import TorchServe, archive_model, java_available, write_config

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("pptp")
    model_dir, store = tiny_llama_and_store(root)
    config = write_config(root / "pptp.yaml", REPO / "examples/pptp/model-config.yaml",
                          maxBatchDelay=300, handler={"max_new_tokens": 24, "max_length": 128})
    archive_model(store, "llama-pptp", config, model_dir)
    with TorchServe(root / "ts", store) as ts:
        ts.start(models={"llama-pptp": "llama-pptp"})
        yield ts, model_dir


def test_concurrent_prompts_match_single_process_generate(server):
    ts, model_dir = server
    lengths = [20, 6, 13]
    responses = predict_concurrently(ts, "llama-pptp", greedy_bodies(lengths))
    for prompt, n, response in zip(PROMPTS, lengths, responses):
        assert response.status_code == 200, response.text
        assert response.json()["generated_text"] == reference_text(model_dir, prompt, n)


@pytest.mark.parametrize("body, status", [(b"{not json", 400), ({"inputs": ""}, 400),
                                          ({"inputs": "hi", "parameters": {"top_p": 2}}, 400)])
def test_bad_request_then_correct_answer(server, body, status):
    ts, model_dir = server
    assert ts.predict("llama-pptp", body).status_code == status
    good = ts.predict("llama-pptp", {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 10}})
    assert good.status_code == 200, good.text
    assert good.json()["generated_text"] == reference_text(model_dir, PROMPTS[1], 10)


def test_stream_equals_plain(server):
    ts, _ = server
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 12}}
    plain = ts.predict("llama-pptp", body).json()["generated_text"]
    assert stream_text(ts.stream_chunks("llama-pptp", {**body, "stream": True})) == plain
