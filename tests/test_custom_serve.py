"""parallelType custom through the real TorchServe 0.12: HuggingFace Accelerate in one process, on CPU.

One server, three archives of one tiny random-weight Llama:
- acc-auto:  device_map auto (everything fits on the CPU), a plain sync worker;
- acc-disk:  handler.max_memory gives the CPU ~60% of the weights, the rest is offloaded to disk, into the
             model folder's `offload/`;
- acc-async: parallelLevel 2 + asyncCommunication true: TorchServe's async worker awaits `handle`.
"""
from __future__ import annotations

import pytest
import yaml

from _llm import PROMPTS, greedy_bodies, predict_concurrently, reference_text, stream_events, stream_text
from ts_plugin.testing import TorchServe, archive_model, java_available

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

MODELS = ("acc-auto", "acc-disk", "acc-async")
BASE = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 200, "responseTimeout": 120,
        "parallelType": "custom", "deviceType": "cpu"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ts_plugin.testing import make_tiny_model

    root = tmp_path_factory.mktemp("custom")
    model_dir = make_tiny_model(root / "llama", arch="llama", shards=3)
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    handler = {"max_new_tokens": 24, "max_length": 128}
    configs = {
        "acc-auto": {**BASE, "handler": {**handler, "device_map": "auto"}},
        "acc-disk": {**BASE, "handler": {**handler, "device_map": "auto", "offload_folder": "offload",
                                         "max_memory": {"cpu": model_bytes * 6 // 10}}},
        # batchSize 1: TorchServe 0.12's async frontend crashes when it batches two requests (see device_map.py)
        "acc-async": {**BASE, "batchSize": 1, "parallelLevel": 2, "asyncCommunication": True, "handler": handler},
    }
    store = root / "store"
    store.mkdir()
    for name, config in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        archive_model(store, name, path, model_dir)
    with TorchServe(root / "ts", store) as ts:
        ts.start(models={name: name for name in MODELS}, timeout=300)
        yield ts, model_dir, store


@pytest.mark.parametrize("name", MODELS)
def test_concurrent_greedy_requests_equal_single_process_generate(server, name):
    ts, model_dir, _ = server
    lengths = [24, 7, 15]
    responses = predict_concurrently(ts, name, greedy_bodies(lengths))
    for prompt, n, response in zip(PROMPTS, lengths, responses):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["generated_text"] == reference_text(model_dir, prompt, n), name
        assert answer["details"]["completion_tokens"] <= n


def test_device_map_is_logged_once_and_disk_offload_stays_in_the_model_folder(server):
    ts, _, store = server
    log = (ts.log_dir / "model_log.log").read_text(encoding="utf-8", errors="replace")
    lines = {name: [line for line in log.splitlines() if f"-{name}_" in line and "device map: " in line]
             for name in MODELS}
    assert all(len(found) == 1 for found in lines.values()), lines
    assert lines["acc-auto"][0].endswith("device map: the whole model -> cpu")
    disk = lines["acc-disk"][0]
    assert "model.embed_tokens" in disk and "-> cpu |" in disk and disk.endswith("-> disk"), disk
    # transformers reads safetensors weights for the disk in place; whatever it must write goes in this folder
    folders = list((store / "acc-disk" / "offload").glob("worker-*"))
    assert folders and all(folder.is_dir() for folder in folders), "the offload folder is inside the model folder"
    assert any(f"offloading to {folder}" in log for folder in folders)


@pytest.mark.parametrize("name", ["acc-disk", "acc-async"])
def test_stream_yields_the_unstreamed_text(server, name):
    ts, _, _ = server
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 16}}
    plain = ts.predict(name, body).json()["generated_text"]
    chunks = ts.stream_chunks(name, {**body, "stream": True})
    events = stream_events(chunks)
    assert len(events) > 2, chunks
    assert stream_text(chunks) == plain
    assert events[-1]["generated_text"] == plain and events[-1]["details"]["completion_tokens"] == 16


def test_huggingface_hubs_tgi_client_reads_the_answers_and_the_stream(server):
    """huggingface_hub's InferenceClient, a real TGI client: text_generation with details, and streamed with
    details (one event per token: its id, text and logprob), gives the answer of single-process generate."""
    from huggingface_hub import InferenceClient
    from transformers import AutoTokenizer

    ts, model_dir, _ = server
    client = InferenceClient(model=f"{ts.inference_url}/predictions/acc-auto",
                             headers={"Authorization": f"Bearer {ts.key}"} if ts.key else None)
    expected = reference_text(model_dir, PROMPTS[1], 12)
    answer = client.text_generation(PROMPTS[1], max_new_tokens=12, details=True)
    assert (answer.generated_text, answer.details.generated_tokens) == (expected, 12)
    assert answer.details.finish_reason == "length"
    events = list(client.text_generation(PROMPTS[1], max_new_tokens=12, details=True, stream=True))
    assert "".join(event.token.text for event in events) == expected == events[-1].generated_text
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = [event.token.id for event in events]
    assert len(ids) == 12 and tokenizer.decode(ids, skip_special_tokens=True) == expected
    assert all(event.token.logprob <= 0 for event in events) and events[-1].details.generated_tokens == 12


def test_async_mode_bad_requests_get_4xx_without_failing_the_others(server):
    ts, model_dir, _ = server
    good = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 10}}
    bodies = [good, b"{not json", {"inputs": "hi", "parameters": {"max_new_tokens": 500}}, good]
    responses = predict_concurrently(ts, "acc-async", bodies)
    assert [r.status_code for r in responses] == [200, 400, 400, 200], [r.text for r in responses]
    assert "invalid JSON" in responses[1].text and "at most 24" in responses[2].text
    expected = reference_text(model_dir, PROMPTS[1], 10)
    assert responses[0].json()["generated_text"] == responses[3].json()["generated_text"] == expected
    # and the worker still answers (a message-level error would have failed every request in flight)
    again = ts.predict("acc-async", good)
    assert again.status_code == 200 and again.json()["generated_text"] == expected


def test_async_worker_is_ready_with_parallel_level_2(server):
    ts, _, _ = server
    (description,) = ts.describe("acc-async")
    assert [w["status"] for w in description["workers"]] == ["READY"]
    log = (ts.log_dir / "model_log.log").read_text(encoding="utf-8", errors="replace")
    assert any("-acc-async_" in line and "handle is awaitable" in line for line in log.splitlines())
