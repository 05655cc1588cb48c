"""parallelType custom, in-process (no TorchServe): the Accelerate engine and the handler."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from _llm import PROMPTS, REPO, reference_text

sys.path.insert(0, str(REPO / "handlers"))

from ts_plugin.config import ModelConfig, ParallelLayout  # noqa: E402
from ts_plugin.distributed import Ranks  # noqa: E402
from ts_plugin.engines import LoadContext  # noqa: E402
from ts_plugin.engines import accelerate as engine  # noqa: E402
from ts_plugin.engines._checkpoint import build_meta_model  # noqa: E402
from ts_plugin.handlers.base import ConfigError  # noqa: E402
from ts_plugin.testing import worker_context  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    from ts_plugin.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("acc") / "llama", arch="llama", shards=3)


@pytest.fixture(scope="module")
def model_bytes(llama) -> int:
    return sum(f.stat().st_size for f in llama.glob("*.safetensors"))


def load(model_dir: Path, messages=None, **handler) -> engine.DispatchedModel:
    config = ModelConfig.model_validate({"parallelType": "custom", "handler": handler})
    context = LoadContext(config, ParallelLayout.of(config), Ranks(0, 1, 0), model_dir, model_dir, CPU, torch.float32,
                          messages.append if messages is not None else lambda _: None)
    return engine.load(context)


def reference_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(ids).logits


def logits(step: engine.DispatchedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return step.model(ids).logits


IDS = torch.tensor([[1, 17, 45, 99, 3, 250, 7, 31]])


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding: the engine's linears sum a step's 3-8 rows in another order
    (engines/_cpu_kernels.py)."""
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --- a handler without TorchServe ----------------------------------------------------------------

def make_handler(model_dir: Path, **config):
    from llm_handler import LLMHandler

    config = {"parallelType": "custom", "deviceType": "cpu", **config}
    handler = LLMHandler()
    handler.initialize(worker_context(model_dir, config))
    return handler


def rows(*bodies) -> list:
    return [{"body": json.dumps(b).encode() if isinstance(b, dict) else b} for b in bodies]


def ask(handler, bodies: list):
    ctx = worker_context(handler.model_dir, {}, batch_size=len(bodies))
    result = handler.handle(rows(*bodies), ctx)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return result, [ctx.get_response_status(i)[0] for i in range(len(bodies))]


# --- the engine ----------------------------------------------------------------------------------

def test_auto_device_map_equals_from_pretrained(llama):
    messages = []
    step = load(llama, messages)
    assert set(step.device_map.values()) == {"cpu"} and step.offload_dir is None
    assert_same_logits(logits(step, IDS), reference_logits(llama, IDS))
    # the rotary inv_freq is a non-persistent buffer (not in the checkpoint): computed for real, not meta
    inv_freq = step.model.model.rotary_emb.inv_freq
    assert not inv_freq.is_meta and inv_freq.abs().sum() > 0
    assert any(m.startswith("device map: ") for m in messages), messages


def test_disk_offload_inside_the_model_folder_equals_from_pretrained(llama, model_bytes):
    messages = []
    step = load(llama, messages, max_memory={"cpu": model_bytes * 6 // 10}, offload_folder="offload")
    try:
        devices = set(step.device_map.values())
        assert devices == {"cpu", "disk"}, step.device_map
        assert [k for k, v in step.device_map.items() if v == "disk" and k.startswith("model.layers")]
        assert step.offload_dir.parent == (llama / "offload").resolve()
        disk_layer = next(k for k, v in step.device_map.items() if v == "disk" and k.startswith("model.layers"))
        # not held in memory: read from disk (the checkpoint's safetensors, in place) at each forward
        assert all(p.is_meta for p in step.model.get_submodule(disk_layer).parameters())
        assert_same_logits(logits(step, IDS), reference_logits(llama, IDS))
        line = next(m for m in messages if m.startswith("device map: "))
        assert "-> cpu" in line and "-> disk" in line
    finally:
        step.close()
    assert not step.offload_dir.exists()


def test_without_offload_folder_a_temporary_folder_is_used_and_removed(llama, model_bytes):
    step = load(llama, max_memory={"cpu": model_bytes // 2})
    try:
        assert "disk" in step.device_map.values()
        assert Path(tempfile.gettempdir()).resolve() in step.offload_dir.resolve().parents
        assert llama.resolve() not in step.offload_dir.resolve().parents
    finally:
        step.close()
    assert not step.offload_dir.exists()


def test_stale_offload_folders_of_dead_processes_are_removed(llama, model_bytes):
    stale = llama / "offload" / "worker-999999999-abc"
    stale.mkdir(parents=True)
    (stale / "x.dat").write_bytes(b"0")
    step = load(llama, max_memory={"cpu": model_bytes // 2}, offload_folder="offload")
    step.close()
    assert not stale.exists()


def test_offload_folder_never_outside_the_model_folder(llama, tmp_path):
    for value in ("../elsewhere", str(tmp_path / "abs"), "."):
        with pytest.raises(engine.EngineError, match="offload_folder"):
            engine.resolve_offload_folder(value, llama)
    os.symlink(tmp_path, llama / "escape")
    try:
        with pytest.raises(engine.EngineError, match="outside the model folder"):
            engine.resolve_offload_folder("escape/offload", llama)
    finally:
        os.unlink(llama / "escape")
    assert engine.resolve_offload_folder("a/b", llama) == llama.resolve() / "a" / "b"


def test_explicit_device_map_is_used_as_given(llama):
    given = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
             "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    step = load(llama, device_map=given, offload_folder="offload")
    try:
        assert step.device_map == given
        assert_same_logits(logits(step, IDS), reference_logits(llama, IDS))
    finally:
        step.close()
    with pytest.raises(engine.EngineError, match="not a module"):
        load(llama, device_map={**given, "model.nope": "cpu"})
    with pytest.raises(engine.EngineError, match="every parameter"):
        load(llama, device_map={k: v for k, v in given.items() if k != "lm_head"})
    with pytest.raises(engine.EngineError, match="GPU"):
        load(llama, device_map={**given, "lm_head": 0})


def test_no_split_module_classes_inferred_from_the_model_and_checked(llama, model_bytes):
    model = build_meta_model(llama, torch.float32)
    assert engine.no_split_classes(model, None) == ["LlamaDecoderLayer"]
    with pytest.raises(engine.EngineError, match="LlamaDecoderLayr"):
        engine.no_split_classes(model, ["LlamaDecoderLayr"])
    handler = ModelConfig.model_validate({"handler": {"max_memory": {"cpu": model_bytes // 2}}}).handler
    device_map = engine.compute_device_map(model, handler, torch.float32, 0, lambda _: None)
    # a decoder layer is never split between devices
    assert all(key.count(".") <= 2 for key in device_map), device_map


def test_device_map_description_groups_consecutive_modules(llama):
    model = build_meta_model(llama, torch.float32)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": 1,
                  "model.layers.3": "disk", "model.norm": "disk", "model.rotary_emb": "disk", "lm_head": "disk"}
    assert engine.describe_device_map(model, device_map) == (
        "model.embed_tokens, model.layers.0-1 -> cpu | model.layers.2 -> cuda:1 | "
        "model.layers.3, model.norm, model.rotary_emb, lm_head -> disk")
    # a cleaned map (whole ModuleList under one key) lists its layers
    assert engine.describe_device_map(model, {"model": "cpu", "lm_head": "disk"}) == "model -> cpu | lm_head -> disk"
    assert engine.describe_device_map(model, {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "disk",
                                              "model.rotary_emb": "disk", "lm_head": "disk"}) == (
        "model.embed_tokens -> cpu | model.layers.0-3, model.norm, model.rotary_emb, lm_head -> disk")


def test_max_memory_keys_and_sizes(llama):
    assert engine.max_memory_for({"cpu": "2MB", "disk": 10}, 0, lambda _: None) == {"cpu": 2_000_000, "disk": 10}
    assert engine.max_memory_for({"1": "1KB", 0: 5, "cpu": 7}, 2, lambda _: None) == {0: 5, 1: 1000, "cpu": 7}
    notes = []
    assert engine.max_memory_for({0: "1GiB", "cpu": 7}, 0, notes.append) == {"cpu": 7}
    assert "ignoring GPU" in notes[0]
    with pytest.raises(engine.EngineError, match="sees 1 GPU"):
        engine.max_memory_for({3: "1GiB"}, 1, lambda _: None)
    with pytest.raises(engine.EngineError, match="not a size"):
        engine.max_memory_for({"cpu": "lots"}, 0, lambda _: None)
    with pytest.raises(engine.EngineError, match="every layer would go to disk"):
        engine.max_memory_for({"disk": "1GB"}, 0, lambda _: None)


def test_low_cpu_mem_usage_false_loads_then_dispatches(llama, model_bytes):
    step = load(llama, low_cpu_mem_usage=False, max_memory={"cpu": model_bytes // 2})
    try:
        assert "disk" in step.device_map.values()
        assert_same_logits(logits(step, IDS), reference_logits(llama, IDS))
    finally:
        step.close()


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_other_architectures_tied_embeddings(tmp_path, arch):
    from ts_plugin.testing import make_tiny_model

    model_dir = make_tiny_model(tmp_path / arch, arch=arch, shards=2)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    step = load(model_dir, max_memory={"cpu": size * 6 // 10})
    try:
        assert "disk" in step.device_map.values()
        assert torch.allclose(logits(step, IDS), reference_logits(model_dir, IDS), atol=1e-6)
    finally:
        step.close()


# --- the handler ---------------------------------------------------------------------------------

def test_handler_greedy_output_equals_generate_and_bad_rows_get_4xx(llama, model_bytes):
    handler = make_handler(llama, handler={"max_new_tokens": 24, "max_memory": {"cpu": model_bytes * 6 // 10},
                                           "offload_folder": "offload"})
    try:
        assert "disk" in handler.model.device_map.values()
        assert "_ll_tokenizer" in vars(handler.grammars)  # the grammar's token table was built at load
        bodies = [{"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 20}}, b"{not json",
                  {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 9}}]
        answers, statuses = ask(handler, bodies)
        assert statuses == [200, 400, 200]
        assert answers[0]["generated_text"] == reference_text(llama, PROMPTS[0], 20)
        assert answers[2]["generated_text"] == reference_text(llama, PROMPTS[1], 9)
        assert "invalid JSON" in answers[1]["error"]
    finally:
        handler.model.close()


@pytest.mark.parametrize("config, words", [
    ({"parallelType": None}, "sets no parallelType"),
    ({"parallelType": "tp", "torchrun": {"nproc-per-node": 2}}, "asks for 2 ranks but torchrun started 1"),
    ({"parallelType": "custom", "parallelLevel": 2, "asyncCommunication": True, "batchSize": 2}, "TSP211"),
])
def test_handler_refuses_configs_it_cannot_serve(llama, config, words):
    from llm_handler import LLMHandler

    handler = LLMHandler()
    with pytest.raises(ConfigError, match=words):
        handler.initialize(worker_context(llama, {k: v for k, v in config.items() if v is not None}))


def test_async_mode_handle_is_awaitable_and_runs_one_batch_at_a_time(llama):
    handler = make_handler(llama, parallelLevel=2, asyncCommunication=True, batchSize=1, handler={"max_new_tokens": 16})
    running, overlap = [0], [0]
    lock = threading.Lock()
    inference = handler.inference

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
        try:
            time.sleep(0.05)
            return inference(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    handler.inference = counted

    async def many():
        contexts = [worker_context(llama, {}) for _ in PROMPTS]
        calls = [handler.handle(rows({"inputs": p, "parameters": {"max_new_tokens": 6 + i}}), ctx)
                 for i, (p, ctx) in enumerate(zip(PROMPTS, contexts))]
        assert all(asyncio.iscoroutine(c) for c in calls)
        return await asyncio.gather(*calls), contexts

    answers, contexts = asyncio.run(many())
    assert overlap[0] == 1
    for i, (prompt, answer, ctx) in enumerate(zip(PROMPTS, answers, contexts)):
        assert ctx.get_response_status(0)[0] == 200
        assert answer[0]["generated_text"] == reference_text(llama, prompt, 6 + i)


def test_async_mode_failure_answers_each_request_not_the_whole_worker(llama):
    from ts.service import PredictionException

    handler = make_handler(llama, parallelLevel=2, asyncCommunication=True, batchSize=1, handler={"max_new_tokens": 8})
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}
    for error, status in ((RuntimeError("boom"), 503), (PredictionException("busy", 429), 429)):
        def broken(*args, **kwargs):
            raise error

        handler.inference = broken
        answers, statuses = ask(handler, [body, body])
        assert statuses == [status, status] and all("error" in a for a in answers)
    del handler.inference  # the class's method again
    answers, statuses = ask(handler, [body])
    assert statuses == [200] and answers[0]["generated_text"] == reference_text(llama, PROMPTS[0], 4)


def test_sync_mode_handle_returns_the_list(llama):
    handler = make_handler(llama, handler={"max_new_tokens": 8})
    ctx = worker_context(llama, {})
    result = handler.handle(rows({"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 5}}), ctx)
    assert isinstance(result, list) and result[0]["generated_text"] == reference_text(llama, PROMPTS[2], 5)


# --- host memory at the peak -------------------------------------------------------------------------

_PEAK = r"""
import json, sys, gc
from pathlib import Path
import torch
from ts_plugin.config import ModelConfig, ParallelLayout
from ts_plugin.distributed import Ranks
from ts_plugin.engines import LoadContext, accelerate as engine
from ts_plugin.engines._checkpoint import build_meta_model

def status():
    values = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(value.split()[0]) * 1024
    return values

path, cpu = Path(sys.argv[1]), int(sys.argv[2])
build_meta_model(path, torch.float32)  # the modeling code's imports belong to the baseline
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (the peak) to the current RSS
base = status()["VmRSS"]
handler = {"max_memory": {"cpu": cpu}, "offload_folder": "offload"}
config = ModelConfig.model_validate({"parallelType": "custom", "handler": handler})
step = engine.load(LoadContext(config, ParallelLayout.of(config), Ranks(0, 1, 0), path, path, torch.device("cpu"),
                               torch.float32, lambda _: None))
sizes = engine.bytes_per_device(step.model, step.device_map, torch.float32)
step.close()
print(json.dumps({"peak_over_baseline": status()["VmHWM"] - base, "cpu_part": sizes.get("cpu", 0)}))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_loading_holds_about_one_shard_not_the_whole_model(tmp_path):
    """A 74 MiB model in 5 shards (18 MiB the largest), 12 MB of cpu, the rest offloaded to disk."""
    from ts_plugin.testing import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "big", arch="llama", layers=8, hidden=512, shards=4)
    files = list(model_dir.glob("*.safetensors"))
    model, shard = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
    result = subprocess.run([sys.executable, "-c", _PEAK, str(model_dir), str(12 * 10**6)], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    peak, cpu_part = measured["peak_over_baseline"], measured["cpu_part"]
    print(f"model {model / 2**20:.1f} MiB, largest shard {shard / 2**20:.1f} MiB, on cpu {cpu_part / 2**20:.1f} MiB, "
          f"peak RSS over baseline while loading {peak / 2**20:.1f} MiB")
    assert peak < cpu_part + 1.5 * shard + 8 * 2**20
    assert peak < model / 2


def test_weights_missing_from_the_checkpoint_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from ts_plugin.testing import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "holed", arch="llama")
    weights = load_file(str(model_dir / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(engine.EngineError, match="lm_head.weight"):
        load(model_dir)


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2", "llama", "opt", "gpt2", "mistral", "phi3"])
def test_every_architecture_loads_with_its_checkpoint_key_mapping(tmp_path, arch):
    """transformers renames checkpoint keys on load (GPT-NeoX's embed_out is the model's lm_head): loading into
    the device map, half of it on disk, must apply that mapping and give from_pretrained's logits."""
    from ts_plugin.testing import make_tiny_model

    model_dir = make_tiny_model(tmp_path / arch, arch=arch, shards=3)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    step = load(model_dir, max_memory={"cpu": size // 2}, offload_folder="offload")
    try:
        assert "disk" in step.device_map.values()
        assert_same_logits(logits(step, IDS), reference_logits(model_dir, IDS))
    finally:
        step.close()
