"""`ts-plugin demo`: the main job end to end on this machine, nothing downloaded.

Builds a tiny random-weight Llama and its tokenizer, shows the validator refusing a conflicting
config, packages one archive per parallelType with `ts-plugin archive`, starts the real TorchServe
with token authorization on, queries each model (and one streamed request), prints a table, and stops
TorchServe. Exits non-zero if any step fails.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# parallelType -> handler file; the config is examples/<parallelType>/model-config.yaml
MODELS = {"tp": "deepspeed_handler.py", "pp": "pipeline_handler.py", "pptp": "pptp_handler.py",
          "custom": "accelerate_handler.py"}
PROMPT = "the quick brown fox"


def _step(message: str) -> None:
    print(f"==> {message}", flush=True)


def _archive(store: Path, name: str, handler: str, model_dir: Path, config: Path) -> None:
    from .archive import archive

    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = archive(["--model-name", name, "--version", "1.0", "--handler", str(REPO / "handlers" / handler),
                        "--extra-files", str(model_dir), "--config-file", str(config), "--export-path", str(store),
                        "--force"])
    if code != 0:
        raise RuntimeError(f"ts-plugin archive {name} failed:\n{err.getvalue()}")


def run_demo(workdir: Path, parallel_types: Optional[Sequence[str]] = None) -> int:
    from ._torchserve import TorchServe
    from .config import validate_file
    from .tiny_model import make_tiny_model

    chosen = [p for p in MODELS if not parallel_types or p in parallel_types]
    missing = [p for p in chosen if not (REPO / "handlers" / MODELS[p]).is_file()]
    if missing:
        print(f"demo: no handler for {', '.join(missing)} in this checkout", file=sys.stderr)
        return 1
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    store = workdir / "model_store"
    store.mkdir(parents=True)
    started = time.perf_counter()

    _step("building a tiny random-weight Llama and a local tokenizer")
    model_dir = make_tiny_model(workdir / "tiny-llama", arch="llama", layers=4, hidden=64, shards=2)

    _step("the validator on a config TorchServe would accept and never serve (examples/invalid)")
    report = validate_file(EXAMPLES / "invalid" / "model-config.yaml")
    print(report.text())
    if report.ok:
        print("demo: the invalid example passed validation", file=sys.stderr)
        return 1

    for ptype in chosen:
        _step(f"ts-plugin archive: {ptype} (examples/{ptype}/model-config.yaml)")
        _archive(store, f"llama-{ptype}", MODELS[ptype], model_dir, EXAMPLES / ptype / "model-config.yaml")

    rows: List[Dict[str, str]] = []
    _step("starting TorchServe (token authorization on) and loading the models")
    with TorchServe(workdir / "torchserve", store, token_auth=True) as server:
        t0 = time.perf_counter()
        server.start(models={f"llama-{p}": f"llama-{p}.mar" for p in chosen})
        _step(f"TorchServe up and {len(chosen)} model(s) READY in {time.perf_counter() - t0:.0f}s")
        import requests

        refused = requests.post(f"{server.inference_url}/predictions/llama-{chosen[0]}", data=PROMPT, timeout=30)
        _step(f"a request without the key is refused: HTTP {refused.status_code}")
        if refused.status_code not in (400, 401):
            raise RuntimeError("token authorization is not in force")
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 16}}
        for ptype in chosen:  # the first request of a worker pays one-off set-up costs; keep it out of the timings
            server.predict(f"llama-{ptype}", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}})
        for ptype in chosen:
            t0 = time.perf_counter()
            response = server.predict(f"llama-{ptype}", body)
            seconds = time.perf_counter() - t0
            if response.status_code != 200:
                raise RuntimeError(f"llama-{ptype}: HTTP {response.status_code} {response.text}")
            answer = response.json()
            tokens = answer["details"]["completion_tokens"]
            rows.append({"model": f"llama-{ptype}", "mode": "plain", "tokens": str(tokens),
                         "seconds": f"{seconds:.2f}", "tok/s": f"{tokens / seconds:.1f}",
                         "answer": json.dumps(answer["generated_text"])[:40]})
        t0 = time.perf_counter()
        chunks = server.stream_chunks(f"llama-{chosen[0]}", {**body, "stream": True})
        seconds = time.perf_counter() - t0
        events = [json.loads(line) for line in b"".join(chunks).decode().splitlines() if line.strip()]
        rows.append({"model": f"llama-{chosen[0]}", "mode": f"stream ({len(events)} lines)",
                     "tokens": str(events[-1]["details"]["completion_tokens"]), "seconds": f"{seconds:.2f}",
                     "tok/s": f"{events[-1]['details']['completion_tokens'] / seconds:.1f}",
                     "answer": json.dumps("".join(e["token"]["text"] for e in events))[:40]})
        _step("stopping TorchServe")
    _print_table(rows)
    same = len({row["answer"] for row in rows}) == 1
    print(f"all answers identical (same weights, greedy): {same}")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0 if same else 1


def _print_table(rows: List[Dict[str, str]]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(row[c].ljust(widths[c]) for c in columns))
