"""Helpers shared by the tests: configs, archives, a served TorchServe, references, a handler load on two ranks."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ts_plugin.testing import reference_answers, torchrun_agent

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
PROMPTS = ["hello world how are", "the quick brown fox jumps over the lazy dog .", "a request"]


# Runs on both ranks: initializes a handler as a worker does and writes what the load ended in
LOAD_SCRIPT = textwrap.dedent(r'''
    import os, sys
    from pathlib import Path

    import yaml

    from ts_plugin.handlers import LLMHandler
    from ts_plugin.testing import worker_context

    model_dir, config_file, out_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    config = yaml.safe_load((model_dir / config_file).read_text())  # TorchServe hands the parsed file over
    handler = LLMHandler()
    try:
        handler.initialize(worker_context(model_dir, config, config_file=config_file))
        message = "loaded"
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
    (out_dir / f"load{handler.ranks.rank}.txt").write_text(message)
    # leave without C++ teardown: destroying the gloo group while the peer is already gone can abort
    # ("terminate called without an active exception") on a loaded machine, which is not what is tested here
    os._exit(0)
''')


def load_on_two_ranks(model_dir: Path, config_file: str, workdir: Path) -> List[str]:
    """What initializing ts_plugin's handler with `model_dir / config_file` under
    `torchrun --nproc-per-node 2` on the CPU ended in, per rank: "loaded" or "ErrorType: message"."""
    from ts_plugin.testing import free_ports

    script = workdir / "load_on_two_ranks.py"
    script.write_text(LOAD_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(workdir)}
    result = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                             str(free_ports(1)[0]), str(script), str(model_dir), config_file, str(workdir)],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return [(workdir / f"load{rank}.txt").read_text() for rank in (0, 1)]


def tiny_llama_and_store(root: Path) -> Tuple[Path, Path]:
    """A tiny Llama in two safetensors shards (root/llama) and an empty model store (root/store)."""
    from ts_plugin.testing import make_tiny_model

    (root / "store").mkdir()
    return make_tiny_model(root / "llama", arch="llama", shards=2), root / "store"


@contextmanager
def serving(workdir: Path, store: Path, names):
    """A TorchServe over `store` with every model in `names` READY."""
    from ts_plugin.testing import TorchServe

    with TorchServe(workdir, store) as ts:
        ts.start(models={name: name for name in names})
        for name in names:
            ts.wait_ready(name)
        yield ts


@contextmanager
def serving_examples(root: Path, models: Dict[str, str], handler_file: Optional[str] = None, **overrides):
    """A TorchServe serving the tiny Llama as each of `models` (name -> example folder), each from its example's
    model-config.yaml with `overrides`, with ts_plugin's handler or `handler_file`; yields (ts, the model folder)."""
    from ts_plugin.testing import archive_model, write_config

    model_dir, store = tiny_llama_and_store(root)
    for name, example in models.items():
        config = write_config(root / f"{name}.yaml", REPO / f"examples/{example}/model-config.yaml", **overrides)
        archive_model(store, name, config, model_dir, handler=handler_file)
    with serving(root / "ts", store, models) as ts:
        yield ts, model_dir


def reference_text(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy single-process HF generate, the ground truth for every parallel layout."""
    return reference_answers(model_dir, [(prompt, max_new_tokens)])[0][1]


def masked_greedy(hf, grammars, grammar, ids: List[int], max_new_tokens: int) -> List[int]:
    """Single-process HF generate, greedy, with llguidance's mask for `grammar` as a logits processor: the tokens
    a row held to that grammar must get (up to its end of sequence)."""
    import torch

    row = grammars.row(grammar)

    def mask(input_ids, scores):
        if input_ids.shape[1] > len(ids):
            row.accept(int(input_ids[0, -1]))
        return row.masked(scores)

    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, logits_processor=[mask])
    new = out[0, len(ids):].tolist()
    eos = hf.generation_config.eos_token_id
    return new[:new.index(eos)] if eos in new else new


def greedy_bodies(lengths: List[int]) -> List[dict]:
    """One request per PROMPTS entry, each with its own max_new_tokens."""
    return [{"inputs": p, "parameters": {"max_new_tokens": n}} for p, n in zip(PROMPTS, lengths)]


def predict_concurrently(ts, name: str, bodies: list) -> list:
    """Send `bodies` at once (so TorchServe can batch them); the responses in the same order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: ts.predict(name, body), bodies))


def scrape(ts, model: Optional[str] = None) -> dict:
    """{metric name: summed value} of TorchServe's Prometheus text, of one model's lines where `model` is named."""
    import re

    import requests

    text = requests.get(f"{ts.metrics_url}/metrics", timeout=10).text
    values: dict = {}
    for line in text.splitlines():
        found = re.match(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})? ([-+\d.eE]+|NaN)$", line)
        if found and (model is None or f'ModelName="{model}"' in (found.group(2) or "")):
            values[found.group(1)] = values.get(found.group(1), 0.0) + float(found.group(3))
    return values


def stream_text(chunks: List[bytes]) -> str:
    return "".join(event["token"]["text"] for event in stream_events(chunks))


def stream_events(chunks: List[bytes]) -> list:
    """Streamed answers are server-sent events (`data: {...}`); chunks may split or join them."""
    import json

    return [json.loads(line[len("data:"):]) for line in b"".join(chunks).decode().splitlines()
            if line.startswith("data:") and line.strip() != "data: [DONE]"]


def stream_interrupted(ts, name: str, body: dict, interrupt: Callable[[], None]) -> Tuple[List[bytes], bool, float]:
    """Stream `body` from model `name`, call `interrupt()` once its first chunk came (kill or stop a rank), and read
    on: (the chunks received, whether the connection was cut, seconds from the interruption to the stream's end)."""
    import requests

    with requests.post(f"{ts.inference_url}/predictions/{name}", json={**body, "stream": True},
                       headers=ts._headers(), stream=True, timeout=120) as response:
        chunks = response.iter_content(chunk_size=None)
        received = [next(chunks)]
        interrupt()
        interrupted = time.monotonic()
        try:
            received += list(chunks)
            cut = False
        except requests.RequestException:  # TorchServe drops the connection of a dead worker's job
            cut = True
    return received, cut, time.monotonic() - interrupted


JSON = {"Content-Type": "application/json"}
# Bodies whose parsing once raised something other than RequestError, which failed the whole batch and cut every
# running stream (issue 29 item 1): (id, route, body, headers). With the JSON content type TorchServe parses the
# body first, and forwards the bytes where its own json.loads fails.
PARSE_CRASHES = [
    ("lone-surrogate", "", b'{"inputs": "\\ud800 hi"}', JSON),
    ("lone-surrogate-untyped", "", b'{"inputs": "hi \\udfff"}', {}),
    ("seed-5000-digits", "", b'{"inputs": "hi", "parameters": {"seed": ' + b"9" * 5000 + b"}}", JSON),
    ("nested-100k", "", b"[" * 100_000, JSON),
    ("stream-options-string", "v1/completions", b'{"prompt": "hi", "stream": true, "stream_options": "x"}', JSON),
]


def bad_body_beside_a_stream(ts, name: str, case: tuple, stream_body: dict, join_running: bool):
    """Send PARSE_CRASHES `case` to model `name` beside a streamed request: after its first chunk (`join_running`,
    continuous batching: it joins the running batch) or at the same moment (static batching: the two share a
    batch). Returns (the bad request's response, the stream's text or what ended it)."""
    from concurrent.futures import ThreadPoolExecutor

    _, route, body, headers = case
    target = f"{name}/1.0/{route}" if route else name

    def stream(after_first_chunk=None) -> str:
        try:
            with ts.predict(name, stream_body, stream=True) as response:
                if response.status_code != 200:
                    return f"HTTP {response.status_code} {response.text[:200]}"
                chunks = response.iter_content(chunk_size=None)
                received = [next(chunks)]
                if after_first_chunk is not None:
                    after_first_chunk()
                received += list(chunks)
            return stream_text(received)
        except Exception as error:  # noqa: BLE001 - a cut stream is the failure under test
            return f"stream ended: {error!r}"

    if join_running:
        bad = []
        text = stream(lambda: bad.append(ts.predict(target, body, headers=headers)))
        return bad[0] if bad else None, text
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream)
        bad = pool.submit(ts.predict, target, body, 120, False, headers)
        return bad.result(), streamed.result()


def worker_processes(ts) -> list:
    """Every rank process (and torchrun agent) of a model worker under this TorchServe."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(arg.endswith("model_service_worker.py") for arg in cmdline) and any(str(ts.tmpdir) in a for a in cmdline):
            found.append(proc)
    return found


def ranks_of(ts, name: str) -> Dict[int, list]:
    """LOCAL_RANK -> the live rank processes of model `name` in this server (torchrun's agent is left out; a worker
    without torchrun is rank 0)."""
    folder = str((ts.model_store / name).resolve())
    ranks: Dict[int, list] = {}
    for proc in worker_processes(ts):
        try:
            if proc.cwd() != folder or proc.status() == "zombie":
                continue
            local_rank = proc.environ().get("LOCAL_RANK", "0")  # a worker TorchServe starts itself: rank 0
            agent = torchrun_agent(proc.cmdline())
        except Exception:  # noqa: BLE001 - psutil.Error: the process just ended
            continue
        if not agent:
            ranks.setdefault(int(local_rank), []).append(proc)
    return ranks


def ranks_rss(ts, name: str, world_size: int) -> int:
    """Bytes resident in all of model `name`'s rank processes, which must be `world_size`."""
    ranks = ranks_of(ts, name)
    assert len(ranks) == world_size and all(len(procs) == 1 for procs in ranks.values()), ranks
    return sum(procs[0].memory_info().rss for procs in ranks.values())


def assert_gone(processes, within: float = 20) -> None:
    """The killed generation's processes end (no orphan keeps the model in memory)."""
    deadline = time.monotonic() + within
    left = processes
    while time.monotonic() < deadline:
        left = [p for p in left if p.is_running() and p.status() != "zombie"]
        if not left:
            return
        time.sleep(0.3)
    raise AssertionError(f"still running {within} s after the restart: {[(p.pid, p.cmdline()[-6:]) for p in left]}")
