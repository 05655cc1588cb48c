"""What handler.compile_step (engines/_compiled.py) does to a decode step: the demo's real model (SmolLM2-135M,
fp32, small_linear in its linears as served) in one HFStepModel, its step compiled at load, then ROWS rows prefilled
to CONTEXT positions and DECODE_STEPS greedy decode steps through the compiled forward and through the eager one,
alternating within each round (in a rotated order); every round's tokens must be equal. The figures are ms per decode
step and the seconds the load's compile took. Writes docs/compiled-step-benchmark.json and its block in
docs/benchmarks.md.

    python -m bench.compiled_step --rounds 3
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional

import torch

from ts_plugin.engines.base import HFStepModel

from .paged_decode import DECODE_STEPS, ROWS, _decode_paged, in_process_args, smollm2
from .report import median_range, ratios, write_block
from .run import log

CONTEXT = 64
WAYS = ("eager", "compiled")


def main(argv: Optional[List[str]] = None) -> int:
    args = in_process_args(__doc__, argv)
    model = smollm2()
    start = time.perf_counter()
    step_model = HFStepModel(model, torch.device("cpu"), compile_step=True, progress=log)
    compile_s = time.perf_counter() - start
    if step_model._compiled is None:
        raise SystemExit("the step did not compile here; see the warning above")
    compiled = step_model._compiled
    runs: Dict[str, List[float]] = {way: [] for way in WAYS}
    same = True
    for round_index in range(args.rounds):
        tokens = {}
        for way in WAYS[round_index % 2:] + WAYS[:round_index % 2]:
            step_model._compiled = compiled if way == "compiled" else None
            step_ms, tokens[way] = _decode_paged(model, CONTEXT, step_model.forward)
            runs[way].append(step_ms)
            log(f"round {round_index + 1} {way}: {step_ms:.1f} ms a step")
        same = same and torch.equal(*tokens.values())
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": "SmolLM2-135M-Instruct (fp32)", "rows": ROWS,
              "context": CONTEXT, "decode_steps": DECODE_STEPS, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "compile_s": round(compile_s, 1), "ms_per_step": runs, "same_tokens": same}
    (args.out / "compiled-step-benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", "compiled-step", render(report))
    return 0


def render(report: Dict[str, Any]) -> str:
    eager, compiled = (report["ms_per_step"][way] for way in WAYS)
    return "\n".join([
        f"{report['date']}: {report['model']}, {report['rows']} rows at {report['context']} positions, "
        f"{report['decode_steps']} greedy decode steps on the paged cache, small_linear in the linears, "
        f"{report['threads']} threads, CPU capability {report['cpu_capability']}; median (min-max) of "
        f"{report['rounds']} round(s), the two alternating. Compiling at load took {report['compile_s']} s. Same "
        f"tokens from both: {report['same_tokens']}.", "",
        "| step | ms a decode step | / eager |", "|---|---|---|",
        f"| eager | {median_range(eager, 1)} | |",
        f"| compiled (handler.compile_step) | {median_range(compiled, 1)} | {median_range(ratios(compiled, eager), 2)} |"])


if __name__ == "__main__":
    raise SystemExit(main())
