"""Static batching through the step loop of this tree against an earlier commit's (by default the padded-cache
loop, before the paged KV cache), in-process on the custom engine's step model.

A static batch of 8 SmolLM2-135M prompts of different lengths (fp32, greedy, 64 new tokens each, 2 threads) goes
through `ts_plugin.continuous.generate` of each tree in a process of its own (the other tree's modules put first on
PYTHONPATH through a git worktree), the two alternating in every round; the figure is completion tokens per
second of the whole batch, and both must give the same tokens. Writes docs/static-batch-benchmark.json and its
block in docs/benchmarks.md.

    python -m bench.static_batch --rounds 3 [--baseline 773c70a]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .report import median_range, ratios, write_block
from .procs import baseline_tree
from .run import REPO, log

BASELINE = "773c70a"  # the last commit with the left-padded cache
ROWS, NEW_TOKENS = 8, 64

_RUN = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from ts_plugin.continuous import generate
from ts_plugin.engines.base import HFStepModel
from ts_plugin.requests import SamplingParams
torch.set_num_threads(2)
path, rows, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(path)
model = HFStepModel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), torch.device("cpu"))
base = "Serving a model too large for one device means splitting it across processes. "
prompts = [tokenizer(base * (1 + row % 4) + f"Question {row}: why?")["input_ids"] for row in range(rows)]
params = [SamplingParams(new_tokens)] * rows  # no eos ids: every row runs to new_tokens
generate(model, tokenizer, prompts[:2], params[:2], 0, [])  # warm-up (and the decode kernel's load)
start = time.perf_counter()
results = generate(model, tokenizer, prompts, params, 0, [])
took = time.perf_counter() - start
print(json.dumps({"tok_s": sum(len(r.token_ids) for r in results) / took, "tokens": [r.token_ids for r in results]}))
"""


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    from ts_plugin.testing.demo import prepare_smollm2

    model = str(prepare_smollm2())
    trees = {"this tree": REPO}
    with baseline_tree(args.baseline) as baseline:
        trees[f"baseline {args.baseline}"] = baseline
        runs: Dict[str, List[float]] = {name: [] for name in trees}
        same = True
        for round_index in range(args.rounds):
            order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
            tokens = {}
            for name in order:
                env = {**os.environ, "PYTHONPATH": str(trees[name])}
                done = subprocess.run([sys.executable, "-c", _RUN, model, str(ROWS), str(NEW_TOKENS)], env=env,
                                      check=True, capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[name].append(result["tok_s"])
                tokens[name] = result["tokens"]
                log(f"round {round_index + 1} {name}: {result['tok_s']:.1f} tok/s")
            same = same and len({json.dumps(t) for t in tokens.values()}) == 1
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": "SmolLM2-135M-Instruct (fp32)", "rows": ROWS,
              "new_tokens": NEW_TOKENS, "rounds": args.rounds, "baseline": args.baseline, "tok_s": runs,
              "same_tokens": same}
    (args.out / "static-batch-benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", "static-batch", render(report))
    return 0


def render(report: Dict[str, Any]) -> str:
    names = list(report["tok_s"])
    mine, theirs = (report["tok_s"][name] for name in names)
    return "\n".join([
        f"{report['date']}: a static batch of {report['rows']} prompts x {report['new_tokens']} greedy new tokens, "
        f"{report['model']}, in-process (custom's step model), 2 threads; median (min-max) of {report['rounds']} "
        f"round(s), the two trees alternating. Same tokens from both: {report['same_tokens']}.", "",
        f"| step loop | completion tok/s | / {names[1]} |", "|---|---|---|",
        f"| {names[0]} (paged KV cache) | {median_range(mine, 1)} | {median_range(ratios(mine, theirs), 2)} |",
        f"| {names[1]} (left-padded cache) | {median_range(theirs, 1)} | |"])


if __name__ == "__main__":
    raise SystemExit(main())
