"""Serving under load: static against continuous batching, with `transformers serve --continuous-batching` on the
same model as the anchor.

The workload: 32 streamed greedy requests from 8 concurrent clients, half 8 and half 128 new tokens, in a shuffled
order, all through OpenAI's streaming v1/completions (ours under /predictions/<model>/1.0/). Figures per server:
completion tokens/s, p99 latency of the 8-token requests, p99 time to first token, and whether every answer
equals single-process generate. Servers run one after another, each alone on the host; `--rounds` repeats the
whole sequence, interleaved. Writes docs/serving-benchmark.json and the table of docs/serving-benchmark.md,
keeping that file's hand-written "## Notes" section.

    python -m bench.serving            # the bench model (~200M parameters), 1 round
    python -m bench.serving --smoke    # a tiny model, 8 requests (a check that it runs)
    python -m bench.serving --model smollm2   # the demo's real model; writes serving-benchmark-smollm2.*
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import requests
import yaml

from .model import FULL, SMOKE, make_model, reference_answers
from .run import REPO, archive, log, model_config

#: (parallelType, continuous batching, batchSize): static and continuous at batchSize 4 as the issue compares them;
#: batchSize 8 admits all 8 clients at once, as the anchor's scheduler does
SERVERS = [(kind, continuous, 4) for kind in ("custom", "tp", "pp") for continuous in (False, True)]
SERVERS += [("custom", True, 8), ("tp", True, 8)]
#: one client, one request at a time: what continuous batching costs where nothing can join, with 1 and 4
#: decode steps per frontend call (handler.steps_per_call)
ONE_CLIENT = [("custom", False, 1), ("custom", True, 1), ("custom", True, 4)]
ONE_CLIENT_JOBS = 4  # requests of `long` new tokens, one after another
PROMPTS = ["the quick brown fox jumps over the lazy dog .", "hello world ! how are you today ?",
           "a request carries a prompt and parameters ,", "tokens flow through stages ; ranks agree on every step ."]


def workload(count: int, short: int, long: int, seed: int = 5) -> List[Dict[str, Any]]:
    jobs = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": short if i % 2 else long} for i in range(count)]
    random.Random(seed).shuffle(jobs)
    return jobs


def stream_one(url: str, body: Dict[str, Any], headers: Dict[str, str]) -> Dict[str, Any]:
    """POST a streaming completion; time to first text and to the end, the text and the completion tokens."""
    start = time.perf_counter()
    first, text, tokens = None, "", None
    with requests.post(url, json={**body, "stream": True, "temperature": 0, "stream_options": {"include_usage": True}},
                       headers=headers, stream=True, timeout=1800) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            piece = "".join(choice.get("text") or "" for choice in event.get("choices") or [])
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft_s": first if first is not None else time.perf_counter() - start,
            "latency_s": time.perf_counter() - start, "text": text, "tokens": tokens}


def run_workload(url: str, model: str, jobs: List[Dict[str, Any]], clients: int,
                 headers: Dict[str, str]) -> Dict[str, Any]:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda job: {**job, **stream_one(url, {"model": model, **job}, headers)}, jobs))
    wall = time.perf_counter() - start
    short = min(job["max_tokens"] for job in jobs)
    completion = sum(r["tokens"] or 0 for r in results)
    return {"wall_s": wall, "completion_tokens": completion, "tokens_per_s": completion / wall,
            "short_p99_s": p99([r["latency_s"] for r in results if r["max_tokens"] == short]),
            "ttft_p99_s": p99([r["ttft_s"] for r in results]), "results": results}


def p99(values: List[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def references(model_dir: Path, jobs: List[Dict[str, Any]]) -> Dict[str, str]:
    """Single-process greedy generate for every distinct (prompt, max_tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    distinct = sorted({(job["prompt"], job["max_tokens"]) for job in jobs})
    answers = reference_answers(model, AutoTokenizer.from_pretrained(str(model_dir)), distinct)
    return {f"{max_tokens}|{prompt}": text for (prompt, max_tokens), (_, text) in zip(distinct, answers)}


def start_anchor(model_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "transformers"
    process = subprocess.Popen([str(exe), "serve", "--continuous-batching", "--host", "127.0.0.1", "--port",
                                str(port), "--device", "cpu", str(model_dir)],
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return process
        except requests.RequestException:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited; see {log_path}")
        time.sleep(1)
    process.kill()
    raise RuntimeError("transformers serve did not come up in 300 s")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--model", choices=["bench", "smollm2"], default="bench",
                        help="the random bench model, or SmolLM2-135M-Instruct (the demo's real model)")
    parser.add_argument("--only", default="custom,tp,pp,anchor",
                        help="the servers to run: parallelTypes and `anchor`, comma-separated")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    from ts_plugin.testing import TorchServe, free_ports

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ts_plugin-serving-"))
    if args.model == "smollm2":
        from ts_plugin.testing.demo import prepare_smollm2

        model_dir = prepare_smollm2()
        size = {"parameters": (model_dir / "model.safetensors").stat().st_size // 4, "name": "SmolLM2-135M-Instruct"}
    else:
        model_dir = workdir / "model"
        size = make_model(model_dir, **(SMOKE if args.smoke else FULL))
    count, short, long = (8, 4, 16) if args.smoke else (32, 8, 128)
    jobs = workload(count, short, long)
    solo_jobs = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": long} for i in range(ONE_CLIENT_JOBS)]
    store = workdir / "store"
    store.mkdir(parents=True, exist_ok=True)
    servers = {}  # name -> (parallelType, config changes, handler changes, one client)
    for kind, continuous, batch in SERVERS:
        name = f"{kind}-{'continuous' if continuous else 'static'}" + ("" if batch == 4 else f"-b{batch}")
        servers[name] = (kind, {"batchSize": batch, "continuousBatching": continuous}, {}, False)
    for kind, continuous, steps in ONE_CLIENT:
        name = f"{kind}-continuous-steps{steps}-1client" if continuous else f"{kind}-static-1client"
        servers[name] = (kind, {"batchSize": 4, "continuousBatching": continuous},
                         {"steps_per_call": steps} if continuous else {}, True)
    servers = {name: server for name, server in servers.items() if server[0] in only}
    for name, (kind, changes, handler, _) in servers.items():
        config = model_config(kind, model_dir, long)
        config.update(maxBatchDelay=50, **changes)
        config["handler"].update(handler)
        (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        archive(store, name, kind, workdir / f"{name}.yaml")
    log(f"model {size['parameters'] / 1e6:.0f}M parameters; {count} requests, {len(servers)} servers + the anchor")
    expected = references(model_dir, jobs + solo_jobs)
    runs: Dict[str, List[Dict[str, Any]]] = {}
    solo: Dict[str, List[Dict[str, Any]]] = {}
    with TorchServe(workdir / "ts", store) as ts:
        ts.start(models={})
        headers = ts._headers()
        for _ in range(args.rounds):
            for name, (*_, one_client) in servers.items():
                ts.register(name, name)
                ts.wait_ready(name)
                url = f"{ts.inference_url}/predictions/{name}/1.0/v1/completions"
                stream_one(url, {"model": name, "prompt": PROMPTS[0], "max_tokens": 2}, headers)  # warm-up
                into = solo if one_client else runs
                into.setdefault(name, []).append(run_workload(url, name, solo_jobs if one_client else jobs,
                                                              1 if one_client else 8, headers))
                log(f"{name}: {into[name][-1]['tokens_per_s']:.1f} tok/s")
                requests.delete(f"{ts.management_url}/models/{name}", headers=ts._headers(management=True),
                                timeout=300)
                time.sleep(3)  # its worker processes go away
            if "anchor" not in only:
                continue
            port = free_ports(1)[0]
            anchor = start_anchor(model_dir, port, workdir / "anchor.log")
            try:
                url = f"http://127.0.0.1:{port}/v1/completions"
                stream_one(url, {"model": str(model_dir), "prompt": PROMPTS[0], "max_tokens": 2}, {})
                runs.setdefault("transformers-serve-cb", []).append(run_workload(url, str(model_dir), jobs, 8, {}))
                log(f"anchor: {runs['transformers-serve-cb'][-1]['tokens_per_s']:.1f} tok/s")
            finally:
                anchor.terminate()
                anchor.wait(60)
    summary = summarize(runs, expected)
    one_client = summarize(solo, expected)
    report = {"model": size, "requests": count, "short": short, "long": long, "clients": 8, "rounds": args.rounds,
              "date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary, "one_client": one_client,
              "runs": {name: [{k: v for k, v in run.items() if k != "results"} for run in rounds]
                       for name, rounds in runs.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("serving-benchmark" + ("-smollm2" if args.model == "smollm2" else "")
            + ("" if only == set(parser.get_default("only").split(",")) else "-" + "-".join(sorted(only))))
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    target = args.out / f"{stem}.md"
    notes = ""  # the hand-written "## Notes" (causes, measurements outside this script) survive a re-run
    if target.is_file() and "\n## Notes" in target.read_text(encoding="utf-8"):
        notes = "\n## Notes" + target.read_text(encoding="utf-8").split("\n## Notes", 1)[1]
    target.write_text(render(report) + notes, encoding="utf-8")
    log(f"wrote {target}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def summarize(runs: Dict[str, List[Dict[str, Any]]], expected: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    """Medians over rounds, and parity: every answer equal to single-process generate."""
    import statistics

    out = {}
    for name, rounds in runs.items():
        out[name] = {key: statistics.median(run[key] for run in rounds)
                     for key in ("tokens_per_s", "short_p99_s", "ttft_p99_s", "wall_s")}
        out[name]["exact"] = all(r["text"] == expected[f"{r['max_tokens']}|{r['prompt']}"]
                                 for run in rounds for r in run["results"])
    return out


def render(report: Dict[str, Any]) -> str:
    summary, anchor = report["summary"], report["summary"].get("transformers-serve-cb")

    def ratios(row, other, keys):
        return ", ".join(f"{row[key] / other[key]:.2f}x" for key in keys) if other and row is not other else ""

    lines = [f"# Serving benchmark ({report['date']})", "",
             f"{report['requests']} streamed greedy requests from {report['clients']} concurrent clients, half "
             f"{report['short']} and half {report['long']} new tokens, shuffled; OpenAI streaming v1/completions; "
             f"model {report['model'].get('name', 'random bench model')} {report['model']['parameters'] / 1e6:.0f}M "
             f"parameters (fp32, CPU); median of {report['rounds']} round(s). Ratios: continuous / static of the "
             "same parallelType, and / the anchor (`transformers serve --continuous-batching`).", "",
             "| server | tokens/s | short p99 (s) | TTFT p99 (s) | vs static: tok/s, short p99, TTFT p99 | "
             "vs anchor: tok/s, short p99 | all answers = generate |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in summary.items():
        static = summary.get(name.split("-")[0] + "-static") if "continuous" in name else None
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {row['short_p99_s']:.2f} | {row['ttft_p99_s']:.2f} | "
                     f"{ratios(row, static, ('tokens_per_s', 'short_p99_s', 'ttft_p99_s'))} | "
                     f"{ratios(row, anchor, ('tokens_per_s', 'short_p99_s'))} | {'yes' if row['exact'] else 'no'} |")
    solo = report.get("one_client") or {}
    static = next((row for name, row in solo.items() if "-static-" in name), None)
    if static:
        lines += ["", f"One client, {ONE_CLIENT_JOBS} requests of {report['long']} new tokens one after another "
                  "(batchSize 4): what continuous batching costs where nothing can join.", "",
                  "| server | tokens/s | static / this (overhead) | all answers = generate |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {row['tokens_per_s']:.1f} | {static['tokens_per_s'] / row['tokens_per_s']:.3f}x | "
                  f"{'yes' if row['exact'] else 'no'} |" for name, row in solo.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
