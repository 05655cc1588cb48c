"""parallelType tp through the real TorchServe, torchrun with 2 ranks, DeepSpeed AutoTP on CPU."""
from __future__ import annotations

import pytest

from _llm import PROMPTS, REPO, greedy_bodies, predict_concurrently, reference_text, stream_events, stream_text
from ts_plugin.testing import TorchServe, archive_model, java_available, write_config

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

ARCHS = ("llama", "opt")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ts_plugin.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tp")
    store = root / "store"
    store.mkdir()
    models = {}
    for arch in ARCHS:
        model_dir = make_tiny_model(root / f"{arch}-model", arch=arch, shards=2 if arch == "llama" else 1,
                                    safetensors=arch == "llama")
        config = write_config(root / f"{arch}.yaml", REPO / "examples/tp/model-config.yaml",
                              batchSize=4, maxBatchDelay=300, handler={"max_new_tokens": 24, "max_length": 128})
        archive_model(store, f"{arch}-tp", config, model_dir)
        models[arch] = model_dir
    with TorchServe(root / "ts", store) as ts:
        ts.start(models={f"{arch}-tp": f"{arch}-tp" for arch in ARCHS})
        for arch in ARCHS:
            ts.wait_ready(f"{arch}-tp")
        yield ts, models


@pytest.mark.parametrize("arch", ARCHS)
def test_concurrent_requests_match_single_process_generate(server, arch):
    ts, models = server
    lengths = [24, 7, 15]
    responses = predict_concurrently(ts, f"{arch}-tp", greedy_bodies(lengths))
    for prompt, n, response in zip(PROMPTS, lengths, responses):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["generated_text"] == reference_text(models[arch], prompt, n)
        assert answer["details"]["completion_tokens"] <= n
        assert answer["details"]["finish_reason"] in ("length", "eos_token")


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "invalid JSON"),
    ({"inputs": 5}, 400, "must be a string"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, 400, "max_new_tokens"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 500}}, 400, "at most 24"),
    ({"inputs": "hi", "parameters": {"temperature": -1}}, 400, "temperature"),
    ({"inputs": "hello " * 200}, 413, "tokens"),
    ({"inputs": "hi", "parameters": {"foo": 1}}, 400, "unknown parameter"),
])
def test_bad_request_gets_4xx_and_next_request_is_correct(server, body, status, words):
    ts, models = server
    response = ts.predict("llama-tp", body)
    assert response.status_code == status, response.text
    assert words in response.text
    good = ts.predict("llama-tp", {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 8}})
    assert good.status_code == 200, good.text
    assert good.json()["generated_text"] == reference_text(models["llama"], PROMPTS[0], 8)


def test_plain_text_body_is_the_prompt(server):
    ts, models = server
    response = ts.predict("llama-tp", PROMPTS[1].encode())
    assert response.status_code == 200, response.text
    assert response.json()["generated_text"] == reference_text(models["llama"], PROMPTS[1], 24)


def test_stream_yields_the_unstreamed_text(server):
    ts, _ = server
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 16}}
    plain = ts.predict("llama-tp", body).json()["generated_text"]
    chunks = ts.stream_chunks("llama-tp", {**body, "stream": True})
    events = stream_events(chunks)
    assert len(events) > 2, chunks
    assert stream_text(chunks) == plain
    final = events[-1]
    assert final["generated_text"] == plain and final["details"]["completion_tokens"] == 16


def test_sampling_with_seed_is_reproducible(server):
    ts, _ = server
    body = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 12, "do_sample": True, "temperature": 0.8,
                                                 "top_k": 20, "top_p": 0.9, "seed": 7}}
    first, second = (ts.predict("llama-tp", body) for _ in range(2))
    assert first.status_code == second.status_code == 200
    assert first.json()["generated_text"] == second.json()["generated_text"]
