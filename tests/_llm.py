"""Helpers shared by the serving tests: tiny models, archives, references."""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import List

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["hello world how are", "the quick brown fox jumps over the lazy dog .", "a request"]


def write_config(path: Path, base: Path, **overrides) -> Path:
    """An example config with some keys replaced (nested dicts merge). A torchrun model gets a free
    rendezvous port of its own, so models and test runs never share one (see rule TSP212)."""
    from torchserve_harness import free_ports

    config = yaml.safe_load(base.read_text())
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    if isinstance(config.get("torchrun"), dict) and "rdzv-endpoint" not in overrides.get("torchrun", {}):
        config["torchrun"]["rdzv-endpoint"] = f"localhost:{free_ports(1)[0]}"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def archive(store: Path, name: str, handler: str, model_dir: Path, config: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ts_plugin", "archive", "--model-name", name, "--version", "1.0",
         "--handler", str(REPO / "handlers" / handler), "--extra-files", str(model_dir),
         "--config-file", str(config), "--export-path", str(store), "--archive-format", "no-archive", "--force"],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@contextmanager
def serving(workdir: Path, store: Path, names):
    """A TorchServe over `store` with every model in `names` READY."""
    from torchserve_harness import TorchServe

    with TorchServe(workdir, store) as ts:
        ts.start(models={name: name for name in names})
        for name in names:
            ts.wait_ready(name)
        yield ts


@lru_cache(maxsize=None)
def _reference_model(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def reference_text(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy single-process HF generate, the ground truth for every parallel layout."""
    import torch

    model, tokenizer = _reference_model(str(model_dir))
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def greedy_bodies(lengths: List[int]) -> List[dict]:
    """One request per PROMPTS entry, each with its own max_new_tokens."""
    return [{"inputs": p, "parameters": {"max_new_tokens": n}} for p, n in zip(PROMPTS, lengths)]


def predict_concurrently(ts, name: str, bodies: list) -> list:
    """Send `bodies` at once (so TorchServe can batch them); the responses in the same order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: ts.predict(name, body), bodies))


def stream_text(chunks: List[bytes]) -> str:
    return "".join(event["token"]["text"] for event in stream_events(chunks))


def stream_events(chunks: List[bytes]) -> list:
    """Streamed answers are JSON lines; chunks may split or join them."""
    import json

    return [json.loads(line) for line in b"".join(chunks).decode().splitlines() if line.strip()]
