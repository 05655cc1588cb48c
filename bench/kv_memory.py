"""Memory per rank against its share and the KV budget: what each rank holds once loaded, and how much more while a
load fills its paged KV cache (handler.kv_cache_memory), on every parallelType through the real TorchServe.

The bench model (bench.run's random Llama of ~200M parameters, fp32), continuous batching, batchSize 8, and two KV
budgets per rank: SMALL_MIB, which 8 concurrent requests of 300-word prompts and 32 new tokens overflow on every
layout (rows wait and are preempted), and LARGE_MIB, which holds them all. Per rank: the resident set at load,
after one short request (the weights' pages resident), and the peak while serving the load (sampled every 50 ms).
The growth over the first request is the KV pool plus what a step allocates besides it; the two budgets tell
them apart: if the pool stops at its budget, the small budget's growth is at most the large one's. Every answer
must be 200. Writes docs/kv-memory-benchmark.json and its block in docs/benchmarks.md.

    python -m bench.kv_memory
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

from ts_plugin.testing import TorchServe

from .procs import BenchError, memory_of, peak_rss
from .report import WORLD, write_block
from ts_plugin.testing.tiny_model import _CORPUS

from .run import ORDER, REPO, log, make_model, package

SMALL_MIB, LARGE_MIB, REQUESTS, NEW_TOKENS, PROMPT_WORDS = 32, 256, 8, 32, 300


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ts_plugin-kv-memory-") as workdir:
        root = Path(workdir)
        spec = make_model(root / "model", smoke=False)
        store = root / "store"
        store.mkdir()
        for kind in ORDER:
            for budget in (SMALL_MIB, LARGE_MIB):
                package(store, f"kv-{kind}-{budget}", kind, root / "model", max_new=NEW_TOKENS,
                        continuousBatching=True, batchSize=REQUESTS, handler={"kv_cache_memory": f"{budget}MiB"})
        words = _CORPUS.split() * 20
        prompts = [" ".join(words[7 * index:7 * index + PROMPT_WORDS]) for index in range(REQUESTS)]
        results: Dict[str, Any] = {}
        with TorchServe(root / "ts", store) as ts:
            ts.start()
            for kind, budget in ((kind, budget) for kind in ORDER for budget in (SMALL_MIB, LARGE_MIB)):
                name = f"kv-{kind}-{budget}"
                ts.register(name, name, timeout=900)
                ranks = ts.workers()
                if len(ranks) != WORLD[kind]:
                    raise BenchError(f"{kind}: expected {WORLD[kind]} ranks, found {sorted(ranks)}")
                at_load = {rank: memory["rss_mib"] for rank, memory in memory_of(ranks).items()}
                # one short request first: the weights' pages (memory-mapped where the engine maps them) are
                # resident from then on, so what the load adds after it is the KV cache and the step's activations
                warm = ts.predict(name, {"inputs": "hello", "parameters": {"max_new_tokens": 2}}, timeout=900)
                if warm.status_code != 200:
                    raise BenchError(f"{kind}: {warm.status_code} {warm.text}")
                warmed = {rank: memory["rss_mib"] for rank, memory in memory_of(ranks).items()}
                bodies = [{"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS}} for prompt in prompts]
                with peak_rss(ranks) as peak, ThreadPoolExecutor(len(bodies)) as pool:
                    answers = list(pool.map(lambda body: ts.predict(name, body, timeout=900), bodies))
                bad = [answer for answer in answers if answer.status_code != 200]
                if bad:
                    raise BenchError(f"{kind}: {bad[0].status_code} {bad[0].text}")
                results.setdefault(kind, {})[str(budget)] = {str(rank): {"load_mib": at_load[rank], "warm_mib": warmed[rank],
                                             "serving_peak_mib": peak[rank]} for rank in sorted(at_load)}
                log(f"{kind}, {budget} MiB: {results[kind][str(budget)]}")
                ts.unregister(name)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": spec, "budgets_mib": [SMALL_MIB, LARGE_MIB],
              "requests": REQUESTS, "new_tokens": NEW_TOKENS, "ranks": results}
    (args.out / "kv-memory-benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", "kv-memory", render(report))
    return 0


def render(report: Dict[str, Any]) -> str:
    small, large = report["budgets_mib"]
    lines = [f"{report['date']}: the bench model ({report['model']['parameters'] / 1e6:.0f}M parameters, fp32), "
             f"continuous batching, handler.kv_cache_memory {small} MiB (less than the load needs on every layout) "
             f"and {large} MiB (all of it) per rank; {report['requests']} concurrent requests of 300-word prompts "
             f"and {report['new_tokens']} new tokens; one run of each. Growth: the peak serving the load over the "
             "resident set after a first short request.", "",
             f"| parallelType | rank | RSS at load (MiB) | after a first request (MiB) | peak at {small} MiB (MiB) "
             f"| growth at {small} MiB | growth at {large} MiB | growth at {small} MiB beyond its budget |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, budgets in report["ranks"].items():
        for rank, memory in budgets[str(small)].items():
            growth = {budget: budgets[str(budget)][rank]["serving_peak_mib"] - budgets[str(budget)][rank]["warm_mib"]
                      for budget in (small, large)}
            lines.append(f"| {kind} | {rank} | {memory['load_mib']:.0f} | {memory['warm_mib']:.0f} | "
                         f"{memory['serving_peak_mib']:.0f} | {growth[small]:.0f} | {growth[large]:.0f} | "
                         f"{growth[small] - small:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
