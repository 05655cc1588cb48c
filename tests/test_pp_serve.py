"""parallelType pp through the real TorchServe 0.12: torch-model-archiver (our archive hook), torchrun with
2 ranks on CPU (gloo), tiny random-weight Llama and GPT-2 with a locally made tokenizer. One server start-up
for the whole file, serving each architecture with pippy.chunks 1 and 2."""
from __future__ import annotations

import json

import pytest

from _llm import PROMPTS, REPO, greedy_bodies, predict_concurrently, reference_text, stream_events, stream_text
from test_pipeline_engine import legacy_bin_checkpoint
from ts_plugin.testing import TorchServe, archive_model, free_ports, java_available, write_config

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

ARCHS = ("llama", "gpt2")
CHUNKS = (1, 2)
MODELS = [f"{arch}-pp-c{chunks}" for arch in ARCHS for chunks in CHUNKS]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ts_plugin.testing import make_tiny_model

    root = tmp_path_factory.mktemp("pp")
    store = root / "store"
    store.mkdir()
    # sharded safetensors, and a single .bin with the base model's key names (as the original GPT-2)
    folders = {"llama": make_tiny_model(root / "llama-model", arch="llama", shards=2),
               "gpt2": legacy_bin_checkpoint(make_tiny_model(root / "gpt2-model", arch="gpt2"), "transformer.")}
    rendezvous = iter(free_ports(len(MODELS)))
    for arch in ARCHS:
        for chunks in CHUNKS:
            name = f"{arch}-pp-c{chunks}"
            config = write_config(
                root / f"{name}.yaml", REPO / "examples/pp/model-config.yaml", batchSize=4, maxBatchDelay=200,
                deviceType="cpu",
                # a rendezvous of its own: torchrun's default localhost:29400 is shared by every server on the host
                torchrun={"nproc-per-node": 2, "rdzv-endpoint": f"127.0.0.1:{next(rendezvous)}"},
                pippy={"chunks": chunks, "rpc_timeout": 300, "num_worker_threads": 8},
                handler={"max_new_tokens": MAX_NEW_TOKENS, "max_length": 128})
            archive_model(store, name, config, folders[arch])
    with TorchServe(root / "ts", store) as ts:
        ts.start(models={name: name for name in MODELS})
        yield ts, folders


def arch_of(name: str) -> str:
    return name.split("-")[0]


@pytest.mark.parametrize("name", MODELS)
def test_concurrent_requests_match_single_process_generate(server, name):
    ts, folders = server
    lengths = [24, 7, 15]
    responses = predict_concurrently(ts, name, greedy_bodies(lengths))
    for prompt, n, response in zip(PROMPTS, lengths, responses):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["generated_text"] == reference_text(folders[arch_of(name)], prompt, n)
        assert answer["details"]["completion_tokens"] <= n
        assert answer["details"]["finish_reason"] in ("length", "eos_token")
    # they reached the handler as one batch (batchSize 4, maxBatchDelay 200 ms), split into `chunks` micro-batches
    chunks = int(name[-1])
    log = (ts.log_dir / "model_log.log").read_text(encoding="utf-8", errors="replace")
    assert any(f"{name}_" in line and f"3 sequence(s) in {chunks} group(s) of rows" in line
               for line in log.splitlines()), ts.log_tail()


@pytest.mark.parametrize("name", ["llama-pp-c2", "gpt2-pp-c1"])
def test_bad_request_then_next_request_is_correct(server, name):
    ts, folders = server
    bad = ts.predict(name, b"{not json")
    assert bad.status_code == 400, bad.text
    assert "invalid JSON" in bad.text
    good = ts.predict(name, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 8}})
    assert good.status_code == 200, good.text
    assert good.json()["generated_text"] == reference_text(folders[arch_of(name)], PROMPTS[0], 8)


def test_bad_request_in_a_batch_leaves_the_others_correct(server):
    ts, folders = server
    bodies = [{"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 10}}, b"{not json",
              {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 500}},  # over handler.max_new_tokens
              {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 6}}]
    responses = predict_concurrently(ts, "llama-pp-c2", bodies)
    assert [r.status_code for r in responses] == [200, 400, 400, 200], [r.text for r in responses]
    assert responses[0].json()["generated_text"] == reference_text(folders["llama"], PROMPTS[1], 10)
    assert responses[3].json()["generated_text"] == reference_text(folders["llama"], PROMPTS[2], 6)


@pytest.mark.parametrize("name", ["llama-pp-c2", "gpt2-pp-c1"])
def test_stream_yields_the_unstreamed_text(server, name):
    ts, folders = server
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 16}}
    plain = ts.predict(name, body).json()["generated_text"]
    assert plain == reference_text(folders[arch_of(name)], PROMPTS[0], 16)
    chunks = ts.stream_chunks(name, {**body, "stream": True})
    events = stream_events(chunks)
    assert len(events) > 2, chunks
    assert all(isinstance(event["token"]["text"], str) for event in events)
    assert stream_text(chunks) == plain
    assert events[-1]["generated_text"] == plain


def test_each_rank_loaded_only_its_stage_and_legacy_keys_are_logged(server):
    ts, _ = server
    log = (ts.log_dir / "model_log.log").read_text(encoding="utf-8", errors="replace")
    for stage in ("pipeline stage 1/2", "pipeline stage 2/2"):
        assert log.count(stage) >= len(MODELS), stage
    assert log.count("pippy.rpc_timeout 300 s is used as the process-group timeout") >= len(MODELS)
    assert log.count("pippy.num_worker_threads 8 is accepted and ignored") >= len(MODELS)
    assert "follower loop running" in log
    # the frontend still reports the workers healthy after everything above
    for name in MODELS:
        workers = ts.describe(name)[0]["workers"]
        assert workers and all(w["status"] == "READY" for w in workers), json.dumps(workers)
