"""Where small_linear and oneDNN beat PyTorch's linear (MKL), by row count, on this CPU: SmolLM2-135M's linear
shapes, float32, 2 threads, the weights read from memory (the calls rotate through enough copies to pass four times
the L3 cache). The figure is us a call, median of the rounds, the ways in turn within each round (oneDNN: its fp32
linear on the plain weight, `torch.ops.mkldnn._linear_pointwise`); linear_plan (engines/_cpu_kernels.py) chooses
among them by the CPU's vendor, which this shows the grounds for. Writes docs/linear-rows-benchmark.json and its
block in docs/benchmarks.md.

    python -m bench.linear_rows --rounds 3
"""
from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ts_plugin.engines import _cpu_kernels

from .paged_decode import in_process_args
from .report import write_block
from .run import log

#: (output, input) features: the MLP's gate/up, the attention's q/o, the LM head
SHAPES = [(1536, 576), (576, 576), (49152, 576)]
ROW_COUNTS = [1, 2, 4, 8, 12, 16, 24, 32, 64, 128]
WAYS = ("MKL", "small_linear", "oneDNN")


def l3_bytes() -> int:
    """The L3 cache's size (32 MiB where the system does not say)."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]]
    except (OSError, ValueError, KeyError):
        return 32 << 20


def time_call(call: Callable[[], Any], calls: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: Optional[List[str]] = None) -> int:
    args = in_process_args(__doc__, argv)
    if _cpu_kernels.load_cpu_kernels() is not None:
        raise SystemExit("the CPU kernels did not build here; see the warning above")
    kernels = _cpu_kernels.KERNELS[0]
    runs: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    for out_features, in_features in SHAPES:
        copies = max(2, -(-4 * l3_bytes() // (out_features * in_features * 4)))
        weights = [torch.randn(out_features, in_features) for _ in range(copies)]
        turn = itertools.count()
        shape = f"{out_features}x{in_features}"
        runs[shape] = {str(rows): {way: [] for way in WAYS} for rows in ROW_COUNTS}
        for rows in ROW_COUNTS:
            x = torch.randn(rows, in_features)
            ways = {"MKL": lambda: F.linear(x, weights[next(turn) % copies]),
                    "small_linear": lambda: kernels.small_linear(x, weights[next(turn) % copies], None),
                    "oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, weights[next(turn) % copies], None,
                                                                          "none", [], "")}
            with torch.inference_mode():
                for round_index in range(args.rounds):
                    for way in WAYS[round_index % 3:] + WAYS[:round_index % 3]:
                        runs[shape][str(rows)][way].append(time_call(ways[way], 2 * copies))
            log(f"{shape} rows {rows}: " + ", ".join(f"{way} {statistics.median(runs[shape][str(rows)][way]):.0f} us"
                                                     for way in WAYS))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "vendor": _cpu_kernels.cpu_vendor(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "l3_bytes": l3_bytes(), "rounds": args.rounds,
              "linear_plan": [_cpu_kernels._FEWEST_ROWS[0], _cpu_kernels._MOST_ROWS[0],
                              _cpu_kernels._ONEDNN_PAST[0]],
              "us_per_call": runs}
    (args.out / "linear-rows-benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", "linear-rows", render(report))
    return 0


def render(report: Dict[str, Any]) -> str:
    shapes = list(report["us_per_call"])
    lines = [f"{report['date']}: {report['vendor']}, CPU capability {report['cpu_capability']}, "
             f"{report['threads']} threads, L3 {report['l3_bytes'] >> 20} MiB; float32, weights rotated through four "
             f"times the L3; us a call, median of {report['rounds']} round(s), the ways in turn. Here linear_plan "
             f"gives small_linear {report['linear_plan'][0]} to {report['linear_plan'][1]} rows and "
             f"{'oneDNN' if report['linear_plan'][2] else 'MKL'} more.", "",
             "| rows | " + " | ".join(f"{shape}: " + ", ".join(WAYS) for shape in shapes) + " |",
             "|---|" + "---|" * len(shapes)]
    for rows in report["us_per_call"][shapes[0]]:
        cells = [", ".join(f"{statistics.median(report['us_per_call'][shape][rows][way]):.0f}" for way in WAYS)
                 for shape in shapes]
        lines.append(f"| {rows} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
