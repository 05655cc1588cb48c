"""The paged KV cache through the real TorchServe, continuous batching, on every parallelType: a bound
(handler.kv_cache_memory) that holds one long request, so concurrent ones wait or are preempted and recomputed,
with every answer equal to single-process greedy generate; a request that can never fit is refused with a 4xx;
cancelled requests give their blocks back; a prompt that begins with another's blocks reads them (prefix cache);
prompts are prefilled in chunks of a 16-token budget beside running streams; Prometheus shows the rows, the
preemptions and the cache's use."""
from __future__ import annotations

import pytest
import torch

from _llm import (PROMPTS, REPO, predict_concurrently, ranks_rss, reference_text, scrape, stream_text,
                  tiny_llama_and_store)
from ts_plugin.engines.base import kv_bytes_per_token
from ts_plugin.testing import TorchServe, archive_model, java_available, write_config

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

NEW_TOKENS = 60
REQUEST_TOKENS = 96  # KV slots (6 blocks) the bound holds: one PROMPTS request and NEW_TOKENS fit
MODELS = {  # name -> (example, tp ranks, pp stages)
    "kv-custom": ("custom", 1, 1),
    "kv-tp": ("tp", 2, 1),
    "kv-pp": ("pp", 1, 2),  # the example's chunks 2: two groups of rows, sharing the blocks
    "kv-pptp": ("pptp", 2, 2),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("kv")
    model_dir, store = tiny_llama_and_store(root)
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    for name, (example, tp, pp) in MODELS.items():
        per_token = kv_bytes_per_token(hf_config, torch.float32, tp, hf_config.num_hidden_layers // pp)
        config = write_config(root / f"{name}.yaml", REPO / f"examples/{example}/model-config.yaml",
                              continuousBatching=True, batchSize=4, maxBatchDelay=50, deviceType="cpu",
                              handler={"max_new_tokens": NEW_TOKENS, "max_length": 200,
                                       "kv_cache_memory": REQUEST_TOKENS * per_token, "max_num_batched_tokens": 16})
        archive_model(store, name, config, model_dir)
    properties = {"metrics_mode": "prometheus", "model_metrics_auto_detect": "true"}
    with TorchServe(root / "ts", store, properties=properties) as ts:
        ts.start(models={name: name for name in MODELS})
        for name in MODELS:
            ts.wait_ready(name)
        yield ts, model_dir


@pytest.mark.parametrize("name", list(MODELS))
def test_requests_beyond_the_bound_wait_or_are_preempted_and_every_answer_is_exact(server, name):
    ts, model_dir = server
    prompts = [PROMPTS[2], "a request again", "another request", "a second request"]  # none ends before NEW_TOKENS
    before = scrape(ts, name).get("num_preemptions", 0)
    answers = predict_concurrently(ts, name, [{"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS}}
                                              for prompt in prompts])
    for prompt, answer in zip(prompts, answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["generated_text"] == reference_text(model_dir, prompt, NEW_TOKENS), prompt
    metrics = scrape(ts, name)
    assert metrics["num_preemptions"] > before  # four rows of ~65 tokens (5 blocks each) outgrew 6 blocks
    assert 0 <= metrics["kv_cache_usage_perc"] <= 1


@pytest.mark.parametrize("name", list(MODELS))
def test_a_request_larger_than_the_bound_gets_a_4xx_and_one_that_fits_is_answered(server, name):
    from transformers import AutoTokenizer

    ts, model_dir = server
    prompt = "tokens flow through stages ; ranks agree on every step . " * 6
    prompt_tokens = len(AutoTokenizer.from_pretrained(str(model_dir))(prompt)["input_ids"])
    too_many = REQUEST_TOKENS - prompt_tokens + 1  # still within handler.max_length and max_new_tokens
    assert too_many <= NEW_TOKENS and prompt_tokens + too_many <= 200
    refused = ts.predict(name, {"inputs": prompt, "parameters": {"max_new_tokens": too_many}})
    assert refused.status_code == 422, refused.text
    assert "kv_cache_memory" in refused.text and f"at most {too_many - 1} new tokens" in refused.text
    fits = ts.predict(name, {"inputs": prompt, "parameters": {"max_new_tokens": too_many - 1}})
    assert fits.status_code == 200, fits.text
    assert fits.json()["generated_text"] == reference_text(model_dir, prompt, too_many - 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_cancelled_requests_leave_the_batch_and_free_the_bound(server, name):
    """Clients that go away after their first token: their rows leave at the next call, so after a request that
    runs to its end no row is left running or waiting, the bound is free again, and 50 of them leave every rank's
    memory flat."""
    import requests

    ts, model_dir = server
    _, tp, pp = MODELS[name]
    body = {"inputs": "another request", "parameters": {"max_new_tokens": NEW_TOKENS}, "stream": True}

    def cancel_one() -> None:
        with requests.post(f"{ts.inference_url}/predictions/{name}", json=body, headers=ts._headers(), stream=True,
                           timeout=60) as response:
            assert response.status_code == 200
            next(response.iter_content(chunk_size=None))

    for _ in range(5):  # the pool's blocks and the step's buffers made
        cancel_one()
    before = ranks_rss(ts, name, tp * pp)
    for _ in range(50):
        cancel_one()
    answer = ts.predict(name, {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 8}})
    assert answer.status_code == 200 and answer.json()["generated_text"] == reference_text(model_dir, PROMPTS[2], 8)
    grown = ranks_rss(ts, name, tp * pp) - before
    assert grown < 64 * 2**20, f"the ranks' memory grew by {grown / 2**20:.1f} MiB over 50 cancelled requests"
    metrics = scrape(ts, name)
    assert metrics["num_requests_running"] == 0 and metrics["num_requests_waiting"] == 0
    assert metrics["kv_cache_usage_perc"] == 0


SHARED = "tokens flow through stages ; ranks agree on every step . " * 4  # 3 blocks and more


@pytest.mark.parametrize("name", list(MODELS))
def test_a_prompt_that_begins_with_another_reads_its_blocks_and_gives_the_same_answer(server, name):
    """OpenAI's usage counts the prompt tokens read from the cache; fewer are computed, the answer is the same."""
    ts, model_dir = server
    usages = []
    for question in ("what is a rank ?", "what is a stage ?"):
        prompt = SHARED + question
        answer = ts.predict(f"{name}/1.0/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == reference_text(model_dir, prompt, 8)
        usages.append(answer.json()["usage"])
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= 32  # its first two blocks at least


@pytest.mark.parametrize("name", list(MODELS))
def test_a_long_prompt_is_prefilled_in_chunks_beside_a_running_stream(server, name):
    """With a budget of 16 tokens a step, a 60-token prompt joins a running stream in chunks; the stream goes on
    and both answers equal single-process greedy generate."""
    import threading

    import requests

    ts, model_dir = server
    long_prompt = "tokens flow through stages ; ranks agree on every step . " * 6
    stream_body = {"inputs": "another request", "parameters": {"max_new_tokens": 30}, "stream": True}
    chunks, long_answer = [], {}
    with requests.post(f"{ts.inference_url}/predictions/{name}", json=stream_body, headers=ts._headers(),
                       stream=True, timeout=120) as response:
        assert response.status_code == 200
        pieces = response.iter_content(chunk_size=None)
        chunks.append(next(pieces))
        joining = threading.Thread(target=lambda: long_answer.update(
            answer=ts.predict(name, {"inputs": long_prompt, "parameters": {"max_new_tokens": 8}})))
        joining.start()
        chunks += list(pieces)
        joining.join(120)
    assert stream_text(chunks) == reference_text(model_dir, "another request", 30)
    answer = long_answer["answer"]
    assert answer.status_code == 200, answer.text
    assert answer.json()["generated_text"] == reference_text(model_dir, long_prompt, 8)
