"""What small_linear (engines/_cpu_kernels.py) does to a decode step: the same paged step with the model's linears
through PyTorch's op (MKL) and through small_linear, in-process, the demo's real model (SmolLM2-135M, fp32, its
lm_head a linear like the others, as served where the kernels are built), ROWS rows prefilled to CONTEXT positions, then DECODE_STEPS greedy decode steps; the
figure is ms per decode step. The two alternate within each round (in a rotated order), and every round's tokens
must be equal. Writes docs/decode-linears-benchmark.json and its block in docs/benchmarks.md.

    python -m bench.decode_linears --rounds 3
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional

import torch

from ts_plugin.engines import _cpu_kernels
from ts_plugin.engines._paged import use_paged_attention

from .paged_decode import DECODE_STEPS, ROWS, _decode_paged, in_process_args, smollm2
from .report import median_range, ratios, write_block
from .run import log

CONTEXT = 64
WAYS = ("PyTorch's linear (MKL)", "small_linear")


def main(argv: Optional[List[str]] = None) -> int:
    args = in_process_args(__doc__, argv)
    model = smollm2()
    use_paged_attention(model)
    if _cpu_kernels.use_small_batch_linears(model) == 0:
        raise SystemExit("the CPU kernels did not build here; see the warning above")
    most_rows = _cpu_kernels._MOST_ROWS[0]
    runs: Dict[str, List[float]] = {way: [] for way in WAYS}
    same = True
    for round_index in range(args.rounds):
        tokens = {}
        for way in WAYS[round_index % 2:] + WAYS[:round_index % 2]:
            _cpu_kernels._MOST_ROWS[0] = most_rows if way == "small_linear" else 0
            step_ms, tokens[way] = _decode_paged(model, CONTEXT)
            runs[way].append(step_ms)
            log(f"round {round_index + 1} {way}: {step_ms:.1f} ms a step")
        same = same and torch.equal(*tokens.values())
    _cpu_kernels._MOST_ROWS[0] = most_rows
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": "SmolLM2-135M-Instruct (fp32)",
              "rows": ROWS, "context": CONTEXT, "decode_steps": DECODE_STEPS, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "ms_per_step": runs, "same_tokens": same}
    (args.out / "decode-linears-benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", "decode-linears", render(report))
    return 0


def render(report: Dict[str, Any]) -> str:
    mkl, small = (report["ms_per_step"][way] for way in WAYS)
    return "\n".join([
        f"{report['date']}: {report['model']}, {report['rows']} rows at {report['context']} positions, "
        f"{report['decode_steps']} greedy decode steps on the paged cache, {report['threads']} threads, CPU "
        f"capability {report['cpu_capability']}; median (min-max) of {report['rounds']} round(s), the two "
        f"alternating. Same tokens from both: {report['same_tokens']}.", "",
        "| linears | ms a decode step | / PyTorch's |", "|---|---|---|",
        f"| {WAYS[0]} | {median_range(mkl, 1)} | |",
        f"| {WAYS[1]} | {median_range(small, 1)} | {median_range(ratios(small, mkl), 2)} |"])


if __name__ == "__main__":
    raise SystemExit(main())
