"""Turn bench.run's measurements into figures (ratios with median, min, max), docs/benchmarks.md and the chart."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

#: the row labels of the table, in order (tests/test_bench_smoke.py checks that each is there)
FIGURE_ROWS = (
    "1. Parity pp 2", "1. Parity tp 2", "1. Parity pptp 2x2", "1. Parity custom",
    "2. Serving overhead tp 2",
    "3. Tensor-parallel efficiency tp 2",
    "4. Pipeline overlap pp 2",
    "5. Memory pp 2 at load", "5. Memory pp 2 serving", "5. Memory tp 2 at load", "5. Memory tp 2 serving",
    "5. Memory custom at load", "5. Memory custom serving",
    "6. Start-up pp 2", "6. Start-up tp 2", "6. Start-up pptp 2x2", "6. Start-up custom",
)
KIND_LABEL = {"pp": "pp 2", "tp": "tp 2", "pptp": "pptp 2x2", "custom": "custom"}
WORLD = {"pp": 2, "tp": 2, "pptp": 4, "custom": 1}
ORDER = ("custom", "pp", "pptp", "tp")  # registration order per round (bench.run.ORDER)


@dataclass
class Row:
    label: str
    target: str
    values: List[float]
    unit: str = "x"  # x (ratio) or % or s
    check: Optional[str] = None  # "<=", ">=", "==" or None (reported, no target)
    threshold: float = 0.0
    what: str = ""
    info: bool = False  # a diagnostic row, not one of the figures
    notes: List[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        values = [v for v in self.values if not math.isnan(v)]
        return statistics.median(values) if values else float("nan")

    @property
    def low(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        return max(self.values) if self.values else float("nan")

    @property
    def status(self) -> str:
        if self.check is None or math.isnan(self.median):
            return "report" if not math.isnan(self.median) else "n/a"
        ok = {"<=": self.median <= self.threshold, ">=": self.median >= self.threshold,
              "==": self.median == self.threshold}[self.check]
        return "pass" if ok else "MISS"

    def fmt(self, value: float) -> str:
        if math.isnan(value):
            return "n/a"
        if self.unit == "%":
            return f"{value:.0f}%"
        if self.unit == "s":
            return f"{value:.1f} s"
        return f"{value:.2f}x"


#: a round of figures 2-4 counts when other jobs on the machine used less than this many cores in each of its steps
QUIET_CORES = 0.25


def selected_pairs(details: Dict[str, Any]) -> Tuple[Dict[str, List[float]], str]:
    """The rounds of figures 2-4 to report: those without other jobs running beside them, when there are at
    least 3 (a tp 2 step keeps both cores in lock-step, so a foreign process running through a request says more
    about that process than about the engine); else every round."""
    pairs = details.get("pairs", {})
    foreign = pairs.get("foreign_cores") or []
    quiet = [i for i, cores in enumerate(foreign) if cores < QUIET_CORES]
    if not foreign:
        return pairs, ""
    if len(quiet) < 3 or len(quiet) == len(foreign):
        note = (f"all {len(foreign)} rounds" if len(quiet) == len(foreign) else
                f"all {len(foreign)} rounds, though other jobs used >= {QUIET_CORES} cores in "
                f"{len(foreign) - len(quiet)} of them")
        return pairs, note
    chosen = {key: [values[i] for i in quiet if i < len(values)] for key, values in pairs.items()}
    return chosen, (f"{len(quiet)} of {len(foreign)} rounds: {len(foreign) - len(quiet)} round(s) in which other "
                    f"jobs used >= {QUIET_CORES} cores set aside")


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> List[float]:
    return [a / b for a, b in zip(numerators, denominators) if b]


def build_rows(results: Dict[str, Any]) -> List[Row]:
    details = results["details"]
    model_mib = results["model"]["bytes"] / 2**20
    rows: List[Row] = []
    parity = details.get("parity", {})
    for kind in ("pp", "tp", "pptp", "custom"):
        found = parity.get(kind)
        value = [100.0 * found["identical"] / found["total"]] if found else []
        row = Row(f"1. Parity {KIND_LABEL[kind]}", "100%", value, "%", "==", 100.0,
                  "greedy answers through TorchServe identical to single-process HF generate")
        if found:
            row.notes.append(f"{found['identical']}/{found['total']} prompts")
        rows.append(row)
    pairs, _ = selected_pairs(details)
    rows.append(Row("2. Serving overhead tp 2", "<= 1.10x",
                    ratios(pairs.get("ts_latency_s", []), pairs.get("inproc_latency_s", [])), "x", "<=", 1.10,
                    "request latency through TorchServe / the same handler under torchrun without TorchServe"))
    queue_s = _median(details.get("ts_metrics", {}).get("queue_ms", [])) / 1000
    if queue_s == queue_s:
        rows.append(Row("2b. Serving overhead without the batching wait", "(diagnostic)",
                        ratios([t - queue_s for t in pairs.get("ts_latency_s", [])], pairs.get("inproc_latency_s", [])),
                        "x", what="as 2, less TorchServe's median queue time (maxBatchDelay)", info=True))
    rows.append(Row("3. Tensor-parallel efficiency tp 2", ">= 0.90x",
                    ratios(pairs.get("tp_decode_tps", []), pairs.get("single_decode_tps", [])), "x", ">=", 0.90,
                    "decode tokens/s, tp 2 (1 thread per rank) / one process with 2 threads"))
    rows.append(Row("3b. tp 2 as DeepSpeed ships it (before the engine fixes)", "(diagnostic)",
                    ratios(pairs.get("tp_gloo_decode_tps", []), pairs.get("single_decode_tps", [])), "x",
                    what="as 3, with DeepSpeed's own layer forwards and inference all-reduce (gloo allreduce)",
                    info=True))
    rows.append(Row("4. Pipeline overlap pp 2", ">= 1.30x",
                    ratios(pairs.get("pp_c4_tps", []), pairs.get("pp_c1_tps", [])), "x", ">=", 1.30,
                    "throughput on a batch of 4 prompts, pippy.chunks 4 / chunks 1"))
    rows.append(Row("4b. pp 2 chunks 4 / 1, prefill-only batch", "(diagnostic)",
                    ratios(pairs.get("pp_c4_prefill_tps", []), pairs.get("pp_c1_prefill_tps", [])), "x",
                    what="as 4, with long prompts and 1 new token: prompt processing only", info=True))
    bare = details.get("bare_rss_mib", {})
    memory = details.get("memory", {})
    for kind in ("pp", "tp", "custom"):
        expected = bare.get(kind, float("nan")) + model_mib / WORLD[kind]
        for phase, key in (("at load", "load_hwm_mib"), ("serving", "serving_peak_mib")):
            values = [max(sample[key].values()) / expected for sample in memory.get(kind, []) if sample[key]]
            rows.append(Row(f"5. Memory {KIND_LABEL[kind]} {phase}", "<= 1.25x", values, "x", "<=", 1.25,
                            f"largest rank's peak RSS / (model / {WORLD[kind]} + bare-import RSS)"))
    startup = details.get("startup_s", {})
    fresh = details.get("fresh_from_pretrained_s", [])
    for kind in ("pp", "tp", "pptp", "custom"):
        # each registration against the fresh-process from_pretrained timed at the start of its round
        values = ratios(startup.get(kind, []), fresh)
        rows.append(Row(f"6. Start-up {KIND_LABEL[kind]}", "(none; reported)", values, "x", None, 0.0,
                        "registration -> READY / a fresh process's from_pretrained of the same checkpoint"))
    return rows


# --- markdown ----------------------------------------------------------------------------------------------------

def _millions(count: int) -> str:
    return f"{count / 1e6:.0f}M" if count >= 10e6 else f"{count / 1e6:.2f}M"


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _table(rows: List[Row]) -> List[str]:
    lines = ["| figure | target | measured (median) | min - max | n | result |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        label = f"{row.label}" + (f" ({'; '.join(row.notes)})" if row.notes else "")
        spread = f"{row.fmt(row.low)} - {row.fmt(row.high)}" if len(row.values) > 1 else "-"
        lines.append(f"| {label} | {row.target} | {row.fmt(row.median)} | {spread} | {len(row.values)} | "
                     f"{'**MISS**' if row.status == 'MISS' else row.status} |")
    return lines


def _stage_times(calls: Dict[str, Dict[str, List[List[float]]]]) -> Dict[str, Dict[str, float]]:
    """Median stage.run seconds per experiment (pp_c1_tps, pp_c4_tps, ...) and rank, for its main kind of step:
    decode steps (1 new token per row) for the batch runs, the prompt step for the prompt-only runs."""
    out: Dict[str, Dict[str, float]] = {}
    for experiment, by_rank in (calls or {}).items():
        want_prompt = "prefill" in experiment
        for rank, entries in by_rank.items():
            if isinstance(entries, dict):  # already summarized (benchmarks.json)
                value = entries.get("prompt_s" if want_prompt else "decode_s")
                if value is not None:
                    out.setdefault(experiment, {})[rank] = value
                continue
            times = [seconds for rows, width, seconds in entries if (width > 1) == want_prompt]
            if times:
                out.setdefault(experiment, {})[rank] = statistics.median(times)
    return out


def _summarize_stage_calls(calls: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The raw (rows, width, seconds) of every stage call -> medians per kind of step, for benchmarks.json."""
    out: Dict[str, Dict[str, Any]] = {}
    for experiment, by_rank in (calls or {}).items():
        for rank, entries in by_rank.items():
            if isinstance(entries, dict):
                out.setdefault(experiment, {})[rank] = entries
                continue
            decode = [sec for rows, width, sec in entries if width == 1]
            prompt = [sec for rows, width, sec in entries if width > 1]
            out.setdefault(experiment, {})[rank] = {
                "decode_s": statistics.median(decode) if decode else None,
                "prompt_s": statistics.median(prompt) if prompt else None, "calls": len(entries)}
    return out


def pipeline_groups(chunks: int = 4) -> int:
    """Groups of rows the pp engine makes of the batch of 4 for `chunks`: at most one per stage."""
    return min(chunks, WORLD["pp"], 4)


def pipeline_bounds(stages: Dict[str, Dict[str, float]], prefill: bool, chunks: int = 4) -> Dict[str, float]:
    """Best case of chunks-m / chunks-1 throughput from the measured stage times, transfers free. chunks 1 costs
    t0(B) + t1(B) per step. The engine makes g groups of B/g rows, interleaved across decode steps, so a decode
    step costs g x max t(B/g) once the pipeline is full; a lone prompt step fills and drains it:
    (g + stages - 1) x max t(B/g)."""
    tag = "prefill_" if prefill else ""
    full, part = stages.get(f"pp_c1_{tag}tps", {}), stages.get(f"pp_c{chunks}_{tag}tps", {})
    if not full or not part or set(full) != set(part):
        return {}
    groups = pipeline_groups(chunks)
    slowest = max(part.values())
    steps = groups + len(part) - 1 if prefill else groups
    return {"bound": sum(full.values()) / (steps * slowest), "groups": groups,
            "full_ms": {r: t * 1000 for r, t in full.items()}, "part_ms": {r: t * 1000 for r, t in part.items()}}


def render_markdown(results: Dict[str, Any], rows: List[Row]) -> str:
    d = results["details"]
    plan = results["plan"]
    model = results["model"]
    by_label = {row.label: row for row in rows}
    figures = [row for row in rows if not row.info]
    missed = [row for row in figures if row.status == "MISS"]
    lines = [
        "# ts_plugin benchmarks",
        "",
        f"Generated by `make bench` (`.venv/bin/python -m bench.run{' --smoke' if plan['smoke'] else ''}`) on "
        f"{results['machine']['date']}: {results['machine']['cpus']} CPUs, no GPU, "
        + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items())
        + f". The whole run took {results['wall_s'] / 60:.1f} min.",
        "",
        f"Model: a random-weight Llama made locally from a config ({_millions(model['parameters'])} parameters: "
        f"{model['layers']} layers, hidden {model['hidden']}, MLP {model['intermediate']}, {model['heads']} heads, "
        f"{model['kv_heads']} KV heads, vocabulary {model.get('vocab', 512)}; fp32, {model['bytes'] / 2**20:.0f} MiB "
        "in sharded safetensors) and a locally trained tokenizer; nothing is downloaded."
        + (" **Smoke run: a tiny model, one repetition: the numbers only show that the benchmark works.**"
           if plan["smoke"] else ""),
        "",
        "This machine is shared and noisy, so every figure is the ratio of two things measured in the same run, "
        "interleaved (A B ... B A); the table gives the median over repetitions (n) with min and max. Absolute "
        "times below are context only and are not comparable across runs. Rows 2b, 3b and 4b are diagnostics, "
        "not targets.",
        "",
        *_table(rows),
        "",
        f"{len(figures) - len(missed)} of {len(figures)} figure rows meet their target or have none"
        + (f"; missed: {', '.join(row.label for row in missed)} (causes below)." if missed else "."),
        "",
        "![ratios per figure, with min-max and targets](benchmarks.png)",
        "",
        "## How each figure is measured",
        "",
        "1. **Parity**: each parallelType is registered in the real TorchServe 0.12 (`torchrun` ranks for "
        "pp/tp/pptp, one worker for custom; the configs of `examples/` with `deviceType: cpu`), and "
        f"{plan['parity_prompts']} prompts are sent at once (batchSize 4) for {plan['parity_new_tokens']} greedy "
        "tokens. Reference: HF `generate` in one process, one prompt at a time. A prompt counts if the text and "
        "the token count are identical.",
        f"2. **Serving overhead**: one request of {plan['latency_new_tokens']} new tokens, timed at the HTTP "
        "client, through TorchServe (tp 2 with `examples/tp`: batchSize 4, maxBatchDelay 100 ms); against the "
        "time of `handle()` of the same handler class with the same config under `torchrun --nproc-per-node 2`, "
        "OMP_NUM_THREADS=1 as TorchServe gives its ranks (`bench/driver.py`: a fake context, as the engine tests "
        "use).",
        "3. **Tensor-parallel efficiency**: decode tokens/s (tokens after the first / time after the first) of that "
        "in-process tp 2 request against one process with 2 threads running the same `ts_plugin.generation` loop "
        "on `from_pretrained`'s model, same prompt.",
        f"4. **Pipeline overlap**: tokens/s of the in-process pp 2 handler on a batch of 4 prompts "
        f"({plan['batch_new_tokens']} new tokens each), `pippy.chunks` 4 against 1: the same loaded pipeline, the "
        f"driver sets the chunks before each batch. With 2 stages the engine makes {pipeline_groups()} groups of rows "
        "of the batch (at most one per stage, rule TSP504), each generated by its own loop, interleaved through the "
        "stages.",
        "5. **Memory**: VmHWM of every rank when the model is READY (load), and the largest VmRSS sampled every "
        "50 ms while it serves the parity prompts (serving), against model bytes / world size + the RSS of a "
        "fresh process that imported what that worker imports (TorchServe's worker, the handler, its engine and "
        "libraries). The row gives the largest rank.",
        "6. **Start-up**: wall time of a synchronous registration (management API; until every rank is READY), "
        "against a fresh Python process that imports transformers and runs `from_pretrained` of the same "
        "checkpoint, timed at the start of the same round. No target: it shows what a parallel worker costs at "
        "start (torchrun, imports, the process group, loading).",
        "",
        "## Details",
        "",
    ]
    for kind, found in d.get("parity", {}).items():
        for miss in found.get("mismatches", []):
            lines.append(f"- parity {kind}: prompt {miss['prompt']!r}: expected {miss['expected']!r}, "
                         f"got {miss['got']!r}")
    lines += _side_by_side(d)
    lines += _memory_table(d, model)
    startup, fresh = d.get("startup_s", {}), d.get("fresh_from_pretrained_s", [])
    if startup:
        lines.append("Start-up, median seconds: " + ", ".join(
            f"{KIND_LABEL[k]} {_median(v):.1f}" for k, v in startup.items() if v)
            + f"; a fresh process's from_pretrained {_median(fresh):.1f} (the `from_pretrained` call alone in a "
            f"warm process: {_median(d.get('from_pretrained_s', [])):.2f}: transformers memory-maps the "
            "safetensors and reads weights on first use).")
        lines.append("")
    lines += _evidence(results)
    lines += _causes(results, by_label)
    lines += _changes()
    lines += ["", "Serving under load (static against continuous batching, and `transformers serve "
              "--continuous-batching` as the anchor): [serving-benchmark.md](serving-benchmark.md), written by "
              "`python -m bench.serving` in the same `make bench`."]
    return "\n".join(lines) + "\n"


def _side_by_side(d: Dict[str, Any]) -> List[str]:
    pairs, note = selected_pairs(d)
    if not pairs:
        return []
    foreign = d.get("pairs", {}).get("foreign_cores") or []
    lines = []
    if foreign:
        lines += [f"Figures 2-4 ran in {len(foreign)} interleaved rounds; CPU used by other jobs on the machine during "
                  "each round (max over its steps, cores): " + ", ".join(f"{c:.2f}" for c in foreign)
                  + f". Reported: {note}.", ""]
    lines += ["| measured side by side | median | min - max |", "| --- | --- | --- |"]
    names = {"ts_latency_s": ("request through TorchServe, tp 2", "s"),
             "inproc_latency_s": ("the same, handler under torchrun (no TorchServe)", "s"),
             "tp_decode_tps": ("decode, tp 2 (the engine's forwards and all-reduce)", "tok/s"),
             "tp_gloo_decode_tps": ("decode, tp 2 with DeepSpeed's layer forwards and gloo's allreduce", "tok/s"),
             "single_decode_tps": ("decode, one process, 2 threads", "tok/s"),
             "pp_c1_tps": ("pp 2, batch of 4, chunks 1", "tok/s"),
             "pp_c4_tps": ("pp 2, batch of 4, chunks 4", "tok/s"),
             "pp_c1_prefill_tps": ("pp 2, prompt-only batch of 4, chunks 1", "tok/s"),
             "pp_c4_prefill_tps": ("pp 2, prompt-only batch of 4, chunks 4", "tok/s")}
    for key, (name, unit) in names.items():
        values = pairs.get(key) or []
        if values:
            lines.append(f"| {name} | {_median(values):.3g} {unit} | {min(values):.3g} - {max(values):.3g} |")
    lines.append("")
    if not d.get("latency_answers_identical", True):
        lines += ["- **the latency prompt's answers differed between TorchServe, in-process tp and the single "
                  "process**", ""]
    return lines


def _memory_table(d: Dict[str, Any], model: Dict[str, Any]) -> List[str]:
    memory, bare = d.get("memory", {}), d.get("bare_rss_mib", {})
    if not memory:
        return []
    lines = ["Memory per rank, MiB (median over rounds): peak RSS at load, peak RSS while serving, and the share it "
             "should hold (model / world size + bare-import RSS):", "",
             "| parallelType | rank | load peak | serving peak | model share + bare | load | serving |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind, samples in memory.items():
        if not samples:
            continue
        share = model["bytes"] / 2**20 / WORLD[kind]
        expected = bare.get(kind, float("nan")) + share
        for rank in sorted(samples[0]["load_hwm_mib"], key=int):
            load = _median([s["load_hwm_mib"][rank] for s in samples])
            serve = _median([s["serving_peak_mib"].get(rank, float("nan")) for s in samples])
            lines.append(f"| {KIND_LABEL[kind]} | {rank} | {load:.0f} | {serve:.0f} | {share:.0f} + "
                         f"{bare.get(kind, float('nan')):.0f} = {expected:.0f} | {load / expected:.2f}x | "
                         f"{serve / expected:.2f}x |")
    lines.append("")
    if memory.get("custom"):
        lines += ["custom: the Accelerate engine leaves the weights memory-mapped from the safetensors files, so they "
                  "enter RSS on the first request, not at load (its load row is below 1x); its serving row is the "
                  "one that counts. pptp is shown for reference (no target).", ""]
    return lines


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def _evidence(results: Dict[str, Any]) -> List[str]:
    """Where the time and memory go: the profiles and measurements the causes below refer to."""
    d = results["details"]
    pairs, _ = selected_pairs(d)
    lines = ["## Where the time and memory go", ""]
    # figure 2
    metrics = d.get("ts_metrics", {})
    if metrics.get("prediction_ms") and pairs.get("ts_latency_s"):
        client = _median(pairs["ts_latency_s"]) * 1000
        frontend = _median(metrics.get("frontend_ms", []))
        queue = _median(metrics.get("queue_ms", []))
        worker = _median(metrics["prediction_ms"])
        inproc = _median(pairs.get("inproc_latency_s", [])) * 1000
        lines += ["### Serving overhead (figure 2)", "",
                  "One tp 2 request, median milliseconds: the client's latency, TorchServe's own metrics "
                  "(ts_metrics.log, model_metrics.log) and the in-process `handle()`:", "",
                  "| client latency | frontend inference latency | of which queue (batch aggregation) | "
                  "worker PredictionTime (per rank) | in-process `handle()` |",
                  "| --- | --- | --- | --- | --- |",
                  f"| {client:.0f} | {frontend:.0f} | {queue:.0f} | {worker:.0f} | {inproc:.0f} |", "",
                  f"So TorchServe adds {client - inproc:.0f} ms ({100 * (client / inproc - 1):.1f}%): {queue:.0f} ms "
                  f"of queue (maxBatchDelay: a lone request waits for a batch of batchSize to fill), "
                  f"{client - frontend:.0f} ms of HTTP and netty, {frontend - queue - worker:.0f} ms between the "
                  f"frontend and the worker, and {worker - inproc:.0f} ms more inside the worker than the same "
                  "handler in-process.", ""]
    cpu = d.get("cpu_beside_requests", {})
    if cpu.get("jvm_during_ts_s"):
        lines += ["CPU time used beside the ranks during one request, median ms: TorchServe's JVM "
                  f"{1000 * _median(cpu['jvm_during_ts_s']):.0f} and the benchmark process (HTTP client) "
                  f"{1000 * _median(cpu['bench_during_ts_s']):.0f} during a TorchServe request; JVM "
                  f"{1000 * _median(cpu['jvm_during_inproc_s']):.0f} and the benchmark process (polling for the "
                  f"result) {1000 * _median(cpu['bench_during_inproc_s']):.0f} during an in-process request.", ""]
    spy = d.get("py_spy", {})
    if spy and all(spy.values()):
        cats = []
        for shares in spy.values():
            cats += [c for c in shares if c not in cats]
        lines += ["py-spy (100 Hz, `--idle`, rank 0's main thread while it serves one request; share of samples):", "",
                  "| | " + " | ".join(spy) + " |", "| --- |" + " --- |" * len(spy)]
        for cat in cats:
            lines.append(f"| {cat} | " + " | ".join(_pct(shares.get(cat, 0.0)) for shares in spy.values()) + " |")
        lines.append("")
    # figure 3
    profiles, comm = d.get("profiles", {}), d.get("comm_bench", {})
    if profiles:
        busy = d.get("profiles_foreign_cores") or []
        lines += ["### Tensor parallelism (figure 3)", "",
                  "torch.profiler on one decode request (self CPU time per category; \"communication\" includes "
                  "DeepSpeed's RowParallel, which waits inside for its all-reduce, and the engine's "
                  "`ts_plugin::all_reduce`)"
                  + (f"; other jobs used {', '.join(f'{c:.2f}' for c in busy)} cores during these three"
                     if busy else "")
                  + ":", "",
                  "| | " + " | ".join(profiles) + " |", "| --- |" + " --- |" * len(profiles),
                  "| decode tok/s | " + " | ".join(f"{p['decode_tps']:.1f}" for p in profiles.values()) + " |",
                  "| wall ms | " + " | ".join(f"{p['wall_ms']:.0f}" for p in profiles.values()) + " |"]
        for cat in sorted({c for p in profiles.values() for c in p["categories"]}):
            lines.append(f"| {cat} | " + " | ".join(
                f"{p['categories'].get(cat, 0):.0f} ms ({100 * p['categories'].get(cat, 0) / p['wall_ms']:.0f}%)"
                for p in profiles.values()) + " |")
        lines.append("")
    if comm:
        lines += ["One all-reduce between the two tp ranks, median microseconds per call (7 x 30 calls, alternating; "
                  "the last column is a bare exchange of the bytes through a Unix socket, without the engine's "
                  "Python around it):", "",
                  "| tensor | gloo allreduce (DeepSpeed's path) | the tp engine's all-reduce | "
                  "bare Unix socket exchange |", "| --- | --- | --- | --- |"]
        for label, times in comm.items():
            sock = times.get("Unix socket exchange")
            lines.append(f"| {label} | {times['gloo allreduce']:.0f} | {times['engine all-reduce']:.0f} | "
                         f"{'-' if sock is None else f'{sock:.0f}'} |")
        lines.append("")
    # figure 4
    stages = _stage_times(d.get("pp_stage_calls", {}))
    if stages:
        lines += ["### Pipeline (figure 4)", "",
                  "One stage step as timed inside the ranks (`stage.run`), median ms, per experiment: decode steps "
                  "for the batch runs, the prompt step for the prompt-only runs:", "",
                  "| experiment | " + " | ".join(f"rank {r}" for r in sorted(next(iter(stages.values())))) + " |",
                  "| --- |" + " --- |" * len(next(iter(stages.values())))]
        part = f"{4 // pipeline_groups()} rows (chunks 4: a group)"
        names = {"pp_c1_tps": "decode, 4 rows (chunks 1)", "pp_c4_tps": f"decode, {part}",
                 "pp_c1_prefill_tps": "prompt, 4 rows (chunks 1)", "pp_c4_prefill_tps": f"prompt, {part}"}
        for key, name in names.items():
            if key in stages:
                lines.append(f"| {name} | " + " | ".join(f"{stages[key][r] * 1000:.1f}" for r in sorted(stages[key]))
                             + " |")
        lines.append("")
        bounds = pipeline_bounds(stages, False)
        if bounds:
            lines.append(f"- decode: with free transfers and perfect overlap, these stage times allow chunks 4 "
                         f"({bounds['groups']} groups interleaved across decode steps) at most "
                         f"**{bounds['bound']:.2f}x** of chunks 1.")
        bounds = pipeline_bounds(stages, True)
        if bounds:
            lines.append(f"- prompt only: one step fills and drains the pipeline; the bound is "
                         f"**{bounds['bound']:.2f}x**.")
        lines.append("")
    # figure 5
    tp_memory = d.get("tp_rank_memory")
    if tp_memory:
        lines += ["### Memory of a tp rank (figure 5)", "",
                  "The in-process tp 2 ranks after figures 2-4, MiB: peak (VmHWM, reached while loading), now "
                  "(VmRSS) = anonymous + file-backed (shared libraries; before the engine change also the "
                  "memory-mapped checkpoint):", "",
                  "| rank | peak | now | anonymous | file-backed |", "| --- | --- | --- | --- | --- |"]
        for entry in tp_memory:
            lines.append(f"| {entry['rank']} | {entry['hwm_mib']:.0f} | {entry['rss_mib']:.0f} | "
                         f"{entry.get('anon_mib', float('nan')):.0f} | {entry.get('file_mib', float('nan')):.0f} |")
        lines.append("")
    during = d.get("tp_ts_peak_during_pairs_mib")
    if during:
        lines += ["TorchServe's tp 2 ranks while serving figures 2-4: peak RSS "
                  + ", ".join(f"rank {r} {v:.0f} MiB" for r, v in sorted(during.items(), key=lambda kv: int(kv[0])))
                  + ".", ""]
    return lines


def _causes(results: Dict[str, Any], by_label: Dict[str, Row]) -> List[str]:
    d = results["details"]
    pairs, _ = selected_pairs(d)
    lines = ["## Why a target is missed", ""]
    count = 0
    row = by_label.get("2. Serving overhead tp 2")
    if row is not None and row.status == "MISS":
        count += 1
        metrics = d.get("ts_metrics", {})
        queue = _median(metrics.get("queue_ms", []))
        worker = _median(metrics.get("prediction_ms", []))
        inproc = _median(pairs.get("inproc_latency_s", [])) * 1000
        client = _median(pairs.get("ts_latency_s", [])) * 1000
        no_wait = by_label.get("2b. Serving overhead without the batching wait")
        skews = [max(v) - min(v) for v in metrics.get("prediction_by_request", {}).values() if len(v) > 1]
        cpu = d.get("cpu_beside_requests", {})
        spy = d.get("py_spy", {})
        ts_spy = next((v for k, v in spy.items() if k.startswith("TorchServe")), {})
        in_spy = next((v for k, v in spy.items() if k.startswith("in-process")), {})
        wait = "all-reduce (incl. waiting for the other rank)"
        lines += [f"### 2. Serving overhead ({row.fmt(row.median)}, min {row.fmt(row.low)}, max {row.fmt(row.high)})",
                  "",
                  f"Of the {client - inproc:.0f} ms TorchServe adds to a {inproc / 1000:.2f} s request, {queue:.0f} ms "
                  "is the batch aggregation wait of the config (batchSize 4, maxBatchDelay 100 ms: the frontend holds "
                  "a lone request that long for company)"
                  + (f"; without it the overhead is {no_wait.fmt(no_wait.median)} (row 2b)" if no_wait else "")
                  + f". Most of the rest is inside the worker: its PredictionTime is {worker - inproc:.0f} ms "
                  f"({100 * (worker / inproc - 1):.0f}%) longer than the same handler's `handle()` in-process."
                  + (f" The two ranks start a request together (their PredictionTimes differ by a median "
                     f"{_median(skews):.0f} ms), so it is not a late rank." if skews else "")
                  + (f" py-spy finds the same work in both (all-reduce and waiting {_pct(ts_spy.get(wait, 0))} in "
                     f"TorchServe's rank 0, {_pct(in_spy.get(wait, 0))} in-process; linear layers "
                     f"{_pct(ts_spy.get('linear layers (matmul)', 0))} and "
                     f"{_pct(in_spy.get('linear layers (matmul)', 0))}); no TorchServe code runs during "
                     "the generation." if ts_spy and in_spy else "")
                  + f" A tp 2 decode step keeps two ranks in lock-step {2 * results['model']['layers'] + 1} times "
                  "per token, so on this 2-core host it slows down with anything else that runs during the request "
                  "(other jobs on the machine as much as the serving stack)"
                  + (f"; the JVM itself used {1000 * _median(cpu['jvm_during_ts_s']):.0f} ms of CPU during a "
                     "TorchServe request" if cpu.get("jvm_during_ts_s") else "")
                  + ". The batching wait is a config choice: a latency-bound deployment sets maxBatchDelay low or "
                  "batchSize 1.", ""]
    row = by_label.get("3. Tensor-parallel efficiency tp 2")
    if row is not None and row.status == "MISS":
        count += 1
        profiles = d.get("profiles", {})
        tp_prof = next((p for k, p in profiles.items() if "engine" in k), None)
        comm_ms = tp_prof["categories"].get("communication: collectives and waiting for them", 0) if tp_prof else 0
        comm_share = comm_ms / tp_prof["wall_ms"] if tp_prof else float("nan")
        gloo = by_label.get("3b. tp 2 as DeepSpeed ships it (before the engine fixes)")
        comm = d.get("comm_bench", {})
        decode = next((v for k, v in comm.items() if k.startswith("decode")), {})
        if gloo is not None and gloo.median < row.median:
            change = (f"The engine's socket all-reduce, its busy-wait and the lean layer forwards raised the ratio "
                      f"from {gloo.fmt(gloo.median)} (row 3b: DeepSpeed's own forwards and gloo's allreduce, same "
                      f"run) to {row.fmt(row.median)}.")
        else:
            change = (f"In this run the engine's path did not beat DeepSpeed's own (row 3b: "
                      f"{gloo.fmt(gloo.median) if gloo else 'n/a'}); see the latency table above.")
        latency = ""
        if decode:
            latency = (f" One all-reduce of a decode step costs {decode['gloo allreduce']:.0f} us through gloo's "
                       f"allreduce and {decode['engine all-reduce']:.0f} us through the engine's.")
        single_prof = next((p for k, p in profiles.items() if k.startswith("single")), None)
        bound = ""
        if tp_prof and single_prof:
            matmul = "matrix multiply / attention kernels"
            tp_matmul = tp_prof["categories"].get(matmul, 0)
            single_rest = single_prof["wall_ms"] - single_prof["categories"].get(matmul, 0)
            bound = (f" The profiles bound it: a tp 2 rank's matrix multiplies alone take {tp_matmul:.0f} ms (half "
                     f"the weights on one thread, both ranks reading memory at once) against the single process's "
                     f"{single_prof['categories'].get(matmul, 0):.0f} ms on two threads, and every rank also runs "
                     f"the whole model's Python and small ops (the single process's {single_rest:.0f} ms). With "
                     f"free communication tp 2 would reach "
                     f"{single_prof['wall_ms'] / (tp_matmul + single_rest):.2f}x on this host; the rank's own "
                     "Python and small ops take "
                     f"{tp_prof['wall_ms'] - tp_matmul - comm_ms:.0f} ms.")
        lines += [f"### 3. Tensor-parallel efficiency ({row.fmt(row.median)}, min {row.fmt(row.low)}, max "
                  f"{row.fmt(row.high)})", "",
                  "Decoding one sequence reads every weight once per token. tp 2 halves what each rank reads, but "
                  f"AutoTP all-reduces twice per decoder layer and once for the LM head: "
                  f"{2 * results['model']['layers'] + 1} round trips between the two processes per token, plus the "
                  "broadcast of the chosen token." + latency + f" Communication and waiting for the other rank take "
                  f"{_pct(comm_share)} of a tp 2 rank's decode time in the profile. " + change + bound, ""]
    row = by_label.get("4. Pipeline overlap pp 2")
    if row is not None and row.status == "MISS":
        count += 1
        stages = _stage_times(d.get("pp_stage_calls", {}))
        bounds = pipeline_bounds(stages, False)
        prefill = by_label.get("4b. pp 2 chunks 4 / 1, prefill-only batch")
        full = bounds.get("full_ms", {})
        part = bounds.get("part_ms", {})
        lines += [f"### 4. Pipeline overlap ({row.fmt(row.median)})", "",
                  f"chunks 4 runs the batch of 4 as {bounds.get('groups', 'n/a')} groups of rows, one per stage, "
                  "interleaved across decode steps. A stage's decode step reads all its weights whatever the rows ("
                  + ", ".join(f"{part[r]:.0f} ms for a group vs {full[r]:.0f} ms for the batch" for r in sorted(part))
                  + " per rank, table above), so the gain is bounded by the stage times: at most "
                  f"{bounds.get('bound', float('nan')):.2f}x here with free transfers, against "
                  f"{row.fmt(row.median)} measured. Prompt processing (row 4b: "
                  f"{prefill.fmt(prefill.median) if prefill else 'n/a'}) also fills and drains the pipeline once "
                  "per batch.", ""]
    for kind in ("tp", "pp", "custom"):
        for phase in ("at load", "serving"):
            row = by_label.get(f"5. Memory {KIND_LABEL[kind]} {phase}")
            if row is None or row.status != "MISS":
                continue
            count += 1
            lines += [f"### 5. Memory, {KIND_LABEL[kind]} {phase} ({row.fmt(row.median)})", ""]
            if kind == "tp" and phase == "at load":
                lines.append(
                    "The engine reads only each rank's slices where it can; where it cannot, every rank loads the "
                    "whole checkpoint and AutoTP slices it, so the peak is about the whole model + its shard over "
                    "the imports. The tp ranks' model log says which path was taken ('loading the whole model on "
                    "every rank: <why>').")
            else:
                lines.append("The largest rank's peak exceeds its share; see the per-rank table above.")
            lines.append("")
    if not count:
        lines += ["No target is missed in this run.", ""]
    return lines


def _changes() -> List[str]:
    return [
        "## Engine changes made for this benchmark",
        "",
        "`ts_plugin/engines/pipeline.py` (parallelType pp):",
        "",
        "- **schedule**: chunks 4 used to split a batch of 4 into 4 micro-batches of 1 row and run them GPipe-style "
        "within each step: the pipeline drained at every token (the next step needs this step's token), and every "
        "stage read its weights 4 times per token, while on this CPU a 1-row decode step cost 35 ms against 53 ms "
        "for 4 rows. Measured 0.58x of chunks 1 (the stage times allowed at most 0.61x). Now the batch is split into "
        "at most one group of rows per stage, and each group runs its own generation loop in a thread of rank 0 "
        "(`generation.generate` with `row_groups`): while stage 1 runs one group's step, stage 0 runs the other's, "
        "across decode steps, so both stages stay busy and each reads its weights twice per token, not four times. "
        "The groups share stage 0 under a lock; every stage works first in, first out, so each group takes its "
        "results back in turn. Answers are unchanged (parity rows; tests/test_generation_groups.py checks grouped "
        "against whole-batch generation, seeds and streaming included).",
        "",
        "`ts_plugin/engines/deepspeed.py` (parallelType tp), on CPU only:",
        "",
        "- **all-reduce**: with 2 ranks, DeepSpeed's inference all-reduce (gloo's ring allreduce) is replaced by an "
        "exchange over a Unix socket between the two ranks (rank 0 listens on a kernel-chosen abstract name and "
        "accepts only rank 1's pid; the socket is non-blocking and each rank sends and receives at once, so no "
        "tensor size can deadlock), then an add: a + b "
        "is the same IEEE sum on both ranks, so they stay bitwise identical, as with gloo. Timeouts are the process "
        "group's; a rank that exits closes the socket and the other fails at once. Other world sizes, reductions "
        "and devices keep DeepSpeed's path, and if the socket cannot be set up both ranks use a gloo isend/irecv "
        "exchange. Found with the profiles above: gloo's allreduce of a decode step's 4 KiB costs about a "
        "millisecond on this host, the same bytes through a Unix socket tens of microseconds (latency table), and "
        "the all-reduces were about half of a tp 2 decode step (profile, middle column). The chosen tokens go "
        "from rank 0 to rank 1 over the same socket (gloo's broadcast took about a millisecond per step).",
        "- **lean layer forwards**: DeepSpeed's AutoTP linear layers (LinearLayer, LinearAllreduce, "
        "LmHeadLinearAllreduce) run each call through autograd Functions (ColumnParallel, RowParallel) and "
        "deepspeed.comm's timed wrappers, and multiply by a transposed view; each rank pays that Python "
        "seven times per Llama decoder layer per token, which made a rank's Python and small ops about 1.7x the "
        "single process's. On CPU with the socket link those layers now run `F.linear` (the same kernel as "
        "`matmul` with `weight.t()`), the socket all-reduce, then the bias, as DeepSpeed does: "
        "tests/test_tp_sliced_load.py checks the logits bitwise against DeepSpeed's own forwards on Llama, Qwen2 "
        "(uneven LM head split) and OPT (biases). Measured outside the benchmark on a quiet machine, 6 "
        "interleaved requests each: 0.93x of the single process against 0.79x with DeepSpeed's forwards (socket "
        "all-reduce in both); a second such run (8 requests) gave 0.85x. Row 3b measures DeepSpeed's own forwards "
        "and all-reduce in the same run (the benchmark switches both per request).",
        "- **waiting for the other rank**: a trace of every exchange (both ranks, monotonic clock) showed a rank "
        "asleep in the socket's receive woken a median 0.07-0.1 ms after the other rank's bytes came, and at times "
        "only milliseconds later (p99 2 ms; as if woken on the other rank's busy CPU), 37 times per token; the rank "
        "that came late then waited for the sleeper's answer. Now a rank busy-waits up to 2 ms before it sleeps in "
        "poll(), as an OpenMP worker thread does (`OMP_WAIT_POLICY=PASSIVE`, or fewer CPUs than ranks, turn it "
        "off): the later rank's exchange took a median 29 us (p99 72 us). Outside the benchmark, 8 interleaved "
        "requests each: 0.94x of the single process with the spin, 0.86x without (and 0.93x spinning up to 20 ms).",
        "- **loading only this rank's slices**: every rank used to run `from_pretrained` of the whole checkpoint "
        "and let AutoTP cut its slices out, so at the peak a rank held the whole model's pages plus its shard "
        "(measured 1.84x of its share at load on this model). Now AutoTP shards a meta-device skeleton, and each "
        "parameter is filled with this rank's block of its checkpoint tensor, read with "
        "`safe_open(...).get_slice`; which block each rank holds comes from DeepSpeed's own affine map "
        "(`collect_autotp_universal_checkpoint_info`), and a layout that is not one dense block of the parameter's "
        "shape, a fused layer, or a `.bin` checkpoint falls back to the whole-model path. Each file is opened per "
        "tensor and the block copied, so only one tensor's pages of the mapping are resident beside the shard "
        "(row 5 tp at load). tests/test_tp_sliced_load.py checks Llama (GQA, tied and untied), Qwen2 with uneven "
        "splits and OPT token for token against HF `generate` and the whole-model path.",
        "- **memory after sharding** (the whole-model path): parameters AutoTP left whole (embeddings, norms) were "
        "still views of the "
        "memory-mapped checkpoint, which kept every file mapped with all the pages AutoTP had read while slicing "
        "resident (measured before the change on this model: 1306 MiB RSS per rank after loading, 542 MiB of it "
        "mapped .safetensors pages, beside a 390 MiB shard). They are now copied tensor by tensor, which drops the "
        "mappings: a rank serves with its share (row 5 tp serving: 1.05x; it was about 1.75x).",
        "",
        "Tests run after the change: tests/test_tp_serve.py and tests/test_reliability.py (tp ranks killed idle and "
        "in flight, 8 clients x 50 mixed requests exact) pass.",
        "",
    ]


# --- chart -------------------------------------------------------------------------------------------------------

def render_chart(rows: List[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio_rows = [r for r in rows if r.unit == "x" and not r.label.startswith("6.") and r.values]
    startup_rows = [r for r in rows if r.label.startswith("6.") and r.values]
    parity_rows = [r for r in rows if r.unit == "%"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 6.5), gridspec_kw={"width_ratios": [3, 1.4, 1.2]})
    colors = {"pass": "#4c9a2a", "MISS": "#c0392b", "report": "#7f8c8d", "n/a": "#bdc3c7"}

    def bars(ax, rows_, xlabel):
        labels = [r.label for r in rows_][::-1]
        medians = [r.median for r in rows_][::-1]
        lows = [max(0.0, r.median - r.low) for r in rows_][::-1]
        highs = [max(0.0, r.high - r.median) for r in rows_][::-1]
        cols = [colors["report"] if r.info else colors[r.status] for r in rows_][::-1]
        y = range(len(rows_))
        ax.barh(list(y), medians, xerr=[lows, highs], color=cols, capsize=3)
        for i, r in enumerate(rows_[::-1]):
            if r.check in ("<=", ">="):
                ax.plot([r.threshold, r.threshold], [i - 0.4, i + 0.4], color="black", linewidth=2)
            ax.text(max(r.median, r.high), i, f"  {r.fmt(r.median)}", va="center", fontsize=8)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlabel(xlabel)

    bars(axes[0], ratio_rows, "ratio (median, min-max whiskers; black tick = target)")
    axes[0].axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    axes[0].set_title("Figures 2-5 (green pass, red miss, grey diagnostic)", fontsize=10)
    if startup_rows:
        bars(axes[1], startup_rows, "registration -> READY / from_pretrained")
    axes[1].set_title("6. Start-up (no target)", fontsize=10)
    if parity_rows:
        bars(axes[2], parity_rows, "% prompts identical")
        axes[2].set_xlim(0, 135)
    axes[2].set_title("1. Parity (target 100%)", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Dict[str, Any], out: Path) -> List[Row]:
    rows = build_rows(results)
    results["figures"] = {row.label: {"target": row.target, "median": row.median, "min": row.low, "max": row.high,
                                      "n": len(row.values), "status": row.status, "values": row.values}
                          for row in rows}
    (out / "benchmarks.md").write_text(render_markdown(results, rows), encoding="utf-8")
    model = results["model"]
    render_chart(rows, out / "benchmarks.png",
                 f"ts_plugin on {results['machine']['cpus']} CPUs, Llama {_millions(model['parameters'])} fp32"
                 + (" (smoke run)" if results["plan"]["smoke"] else "") + f", {results['machine']['date']}")
    results["details"]["pp_stage_calls"] = _summarize_stage_calls(results["details"].get("pp_stage_calls", {}))
    (out / "benchmarks.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return rows
