"""vLLM's serving metrics on TorchServe's Prometheus endpoint: a real TorchServe in prometheus mode (with
model_metrics_auto_detect), a continuous custom model, two requests that share a prefix; the counters add up to
what the answers report, the prefix cache's hits are the second answer's cached tokens, and each request shows
in the latency histograms."""
from __future__ import annotations

import pytest

from _llm import REPO, scrape, tiny_llama_and_store
from ts_plugin.testing import TorchServe, archive_model, java_available, write_config

pytestmark = pytest.mark.serve


def test_vllm_named_metrics_reach_the_prometheus_endpoint(tmp_path):
    if not java_available():
        pytest.skip("TorchServe needs Java 11+")
    model_dir, store = tiny_llama_and_store(tmp_path)
    config = write_config(tmp_path / "m.yaml", REPO / "examples/custom/model-config.yaml", batchSize=4,
                          deviceType="cpu", continuousBatching=True, maxBatchDelay=20,
                          handler={"max_new_tokens": 16})
    archive_model(store, "m", config, model_dir)
    properties = {"metrics_mode": "prometheus", "model_metrics_auto_detect": "true"}
    with TorchServe(tmp_path / "ts", store, properties=properties) as ts:
        ts.start(models={"m": "m"})
        ts.wait_ready("m")
        shared = "A system prompt that every request of this application starts with, long enough for blocks. " * 3
        answers = [ts.predict("m/1.0/v1/completions", {"prompt": shared + question, "max_tokens": 8,
                                                        "temperature": 0}).json()
                   for question in ("First?", "Second?")]
        usage = [answer["usage"] for answer in answers]
        metrics = scrape(ts)
    assert metrics["generation_tokens"] == sum(u["completion_tokens"] for u in usage)
    assert metrics["prompt_tokens"] == metrics["prefix_cache_queries"] == sum(u["prompt_tokens"] for u in usage)
    assert metrics["prefix_cache_hits"] == usage[1]["prompt_tokens_details"]["cached_tokens"] > 0
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert metrics[f"{histogram}_count"] == 2 and metrics[f"{histogram}_sum"] > 0
    assert metrics["num_requests_running"] == 0 and metrics["num_requests_waiting"] == 0
