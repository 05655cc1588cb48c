"""bench.run's measurements as figures (ratios: median, min, max): a generated block of docs/benchmarks.md (between
its `bench:figures` markers; the prose around the blocks is written by hand) and docs/benchmarks.png.

    python -m bench.report [docs]      # render again from docs/benchmarks.json
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

KIND_LABEL = {"pp": "pp 2", "tp": "tp 2", "pptp": "pptp 2x2", "custom": "custom"}
WORLD = {"pp": 2, "tp": 2, "pptp": 4, "custom": 1}  # ranks per parallelType
#: a round of figures 2-4 counts when other jobs used less than this many cores in each of its steps
QUIET_CORES = 0.25
SIDE_BY_SIDE = {
    "ts_latency_s": "one request through TorchServe, tp 2", "inproc_latency_s": "the same, handler under torchrun",
    "tp_decode_tps": "decode, tp 2", "single_decode_tps": "decode, one process with 2 threads",
    "tp_deepspeed_forwards_decode_tps": "decode, tp 2 with DeepSpeed's layer forwards",
    "pp_c1_tps": "pp 2, batch of 4, chunks 1", "pp_c4_tps": "pp 2, batch of 4, chunks 4",
    "pp_c1_prefill_tps": "pp 2, prompt-only batch of 4, chunks 1", "pp_c4_prefill_tps": "the same, chunks 4"}


@dataclass
class Row:
    label: str
    target: str
    values: List[float]
    check: Optional[str] = None  # "<=", ">=", "==" or None (reported, no target)
    threshold: float = 0.0
    unit: str = "x"  # x (a ratio) or %

    @property
    def median(self) -> float:
        return _median(self.values)

    @property
    def status(self) -> str:
        if math.isnan(self.median):
            return "n/a"
        if self.check is None:
            return "report"
        ok = {"<=": self.median <= self.threshold, ">=": self.median >= self.threshold,
              "==": self.median == self.threshold}[self.check]
        return "pass" if ok else "MISS"

    def fmt(self, value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.0f}%" if self.unit == "%" else f"{value:.2f}x"


def median_range(values: Sequence[float], digits: int) -> str:
    """"median (min-max)" of a figure's rounds."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> List[float]:
    return [a / b for a, b in zip(numerators, denominators) if b]


def quiet_pairs(results: Dict[str, Any]) -> Dict[str, List[float]]:
    """The side-by-side samples of the rounds in which other jobs stayed under QUIET_CORES (all rounds when
    fewer than 3 were quiet)."""
    foreign = results.get("foreign_cores", [])
    quiet = [i for i, cores in enumerate(foreign) if cores < QUIET_CORES]
    if len(quiet) < 3:
        return results.get("pairs", {})
    return {key: [values[i] for i in quiet if i < len(values)] for key, values in results.get("pairs", {}).items()}


def build_rows(results: Dict[str, Any]) -> List[Row]:
    rows = [Row(f"1. Parity {KIND_LABEL[kind]}", "100%",
                [100.0 * sum(same) / len(same)] if (same := results["parity"].get(kind)) else [], "==", 100.0, "%")
            for kind in KIND_LABEL]
    pairs = quiet_pairs(results)
    single = pairs.get("single_decode_tps", [])
    rows += [Row("2. Serving overhead tp 2", "<= 1.10x",
                 ratios(pairs.get("ts_latency_s", []), pairs.get("inproc_latency_s", [])), "<=", 1.10),
             Row("3. Tensor-parallel efficiency tp 2", ">= 0.90x", ratios(pairs.get("tp_decode_tps", []), single),
                 ">=", 0.90),
             Row("3b. tp 2 with DeepSpeed's own layer forwards", "(diagnostic)",
                 ratios(pairs.get("tp_deepspeed_forwards_decode_tps", []), single)),
             Row("4. Pipeline overlap pp 2", ">= 1.30x", ratios(pairs.get("pp_c4_tps", []), pairs.get("pp_c1_tps", [])),
                 ">=", 1.30),
             Row("4b. pp 2 chunks 4 / 1, prefill-only batch", "(diagnostic)",
                 ratios(pairs.get("pp_c4_prefill_tps", []), pairs.get("pp_c1_prefill_tps", [])))]
    model_mib = results["model"]["bytes"] / 2**20
    for kind in ("pp", "tp", "custom"):
        share = results["bare_rss_mib"][kind] + model_mib / WORLD[kind]
        for phase, key in (("at load", "load_hwm_mib"), ("serving", "serving_peak_mib")):
            rows.append(Row(f"5. Memory {KIND_LABEL[kind]} {phase}", "<= 1.25x",
                            [max(sample[key]) / share for sample in results["memory"][kind]], "<=", 1.25))
    fresh = results["fresh_from_pretrained_s"]
    rows += [Row(f"6. Start-up {KIND_LABEL[kind]}", "(none; reported)", ratios(results["startup_s"][kind], fresh))
             for kind in KIND_LABEL]
    return rows


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def render_markdown(results: Dict[str, Any], rows: List[Row]) -> str:
    machine, model = results["machine"], results["model"]
    lines = [f"Run of {machine['date']} ({'smoke' if results['plan']['smoke'] else 'full'}, "
             f"{results['wall_s'] / 60:.1f} min): {machine['cpus']} CPUs, torch {machine['torch']}, transformers "
             f"{machine['transformers']}, deepspeed {machine['deepspeed']}, accelerate {machine['accelerate']}, "
             f"torchserve {machine['torchserve']}; model: {model['parameters'] / 1e6:.1f}M parameters, "
             f"{model['bytes'] / 2**20:.0f} MiB fp32.", "",
             "| figure | target | measured (median) | min - max | n | result |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        spread = f"{row.fmt(min(row.values))} - {row.fmt(max(row.values))}" if len(row.values) > 1 else "-"
        lines.append(f"| {row.label} | {row.target} | {row.fmt(row.median)} | {spread} | {len(row.values)} | "
                     f"{row.status} |")
    foreign = results.get("foreign_cores", [])
    lines += ["", f"Rounds of figures 2-4: {len(foreign)}; cores other jobs used in each: "
              + ", ".join(f"{c:.2f}" for c in foreign) + f" (rounds under {QUIET_CORES} count when 3 or more are)."
              f" The answers of figures 2-3 were {'all' if results['latency_answers_identical'] else 'NOT all'} "
              "identical.", "", "| measured side by side (median) | value |", "| --- | --- |"]
    for key, values in quiet_pairs(results).items():
        unit = "s" if key.endswith("_s") else "tok/s"
        lines.append(f"| {SIDE_BY_SIDE.get(key, key)} | {_median(values):.3g} {unit} |")
    lines += ["", "Peak RSS per rank, MiB (median over rounds), against the share a rank should hold (model / world "
              "size + the RSS of a process that imported what the worker imports):", "",
              "| parallelType | at load | serving | share |", "| --- | --- | --- | --- |"]
    for kind, samples in results["memory"].items():
        load, serving = ([round(_median(values)) for values in zip(*(sample[key] for sample in samples))]
                         for key in ("load_hwm_mib", "serving_peak_mib"))
        share = results["bare_rss_mib"][kind] + results["model"]["bytes"] / 2**20 / WORLD[kind]
        lines.append(f"| {KIND_LABEL[kind]} | {load} | {serving} | {share:.0f} |")
    startup = ", ".join(f"{KIND_LABEL[k]} {_median(v):.1f}" for k, v in results["startup_s"].items())
    lines += ["", f"Start-up, median seconds: {startup}; a fresh process's from_pretrained "
              f"{_median(results['fresh_from_pretrained_s']):.1f}."]
    return "\n".join(lines)


def render_chart(rows: List[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row.unit == "x" and row.values][::-1]
    colors = {"pass": "#4c9a2a", "MISS": "#c0392b", "report": "#7f8c8d", "n/a": "#bdc3c7"}
    fig, ax = plt.subplots(figsize=(11, 0.38 * len(shown) + 1.5))
    medians = [row.median for row in shown]
    whiskers = [[row.median - min(row.values) for row in shown], [max(row.values) - row.median for row in shown]]
    ax.barh(range(len(shown)), medians, xerr=whiskers, color=[colors[row.status] for row in shown], capsize=3)
    for i, row in enumerate(shown):
        if row.check in ("<=", ">="):
            ax.plot([row.threshold] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
        ax.text(max(row.values), i, f"  {row.fmt(row.median)}", va="center", fontsize=8)
    ax.set_yticks(range(len(shown)), [row.label for row in shown], fontsize=8)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("ratio: median, min-max whiskers; black tick = target (green pass, red miss, grey no target)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_block(page: Path, name: str, text: str) -> None:
    """Put `text` between the `bench:<name>` markers of `page` (appended with them where they are missing): the
    hand-written text around the blocks stays as it is."""
    begin, end = f"<!-- bench:{name}:begin (generated by bench/) -->", f"<!-- bench:{name}:end -->"
    page_text = page.read_text(encoding="utf-8") if page.exists() else ""
    if begin in page_text and end in page_text:
        before, after = page_text.split(begin)[0], page_text.split(end, 1)[1]
    else:
        before, after = page_text + ("\n" if page_text else ""), "\n"
    page.write_text(f"{before}{begin}\n{text.rstrip()}\n{end}{after}", encoding="utf-8")


def write_report(results: Dict[str, Any], out: Path) -> List[Row]:
    """Write the figures' block of `out`/benchmarks.md and draw the chart."""
    rows = build_rows(results)
    write_block(out / "benchmarks.md", "figures", render_markdown(results, rows))
    render_chart(rows, out / "benchmarks.png", f"ts_plugin on {results['machine']['cpus']} CPUs, "
                 f"{results['machine']['date']}" + (" (smoke run)" if results["plan"]["smoke"] else ""))
    return rows


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs")
    write_report(json.loads((folder / "benchmarks.json").read_text()), folder)
