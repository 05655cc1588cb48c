"""What appending to the KV cache costs a decode step: transformers' DynamicLayer (torch.cat, a copy of every
row's keys and values per step) against ts_plugin's SpareRoomLayer (written in place into spare room).

In-process, the demo's real model (SmolLM2-135M, fp32): 8 rows prefilled to each context length, then DECODE_STEPS
greedy decode steps; the figure is ms per decode step. The two caches alternate within each round (A B, then
B A), and every round's tokens must be equal. Writes docs/kv-append-benchmark.json and its block in
docs/benchmarks.md.

    python -m bench.kv_append --rounds 3
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ts_plugin.engines._kv_cache import new_kv_cache

from .report import median_range, ratios, write_block
from .run import REPO, log

ROWS, DECODE_STEPS = 8, 48
LENGTHS = (64, 512, 1024)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, DynamicCache

    from ts_plugin.testing.demo import prepare_smollm2

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(prepare_smollm2(), dtype=torch.float32).eval()
    caches = {"DynamicLayer": lambda: DynamicCache(config=model.config),
              "SpareRoomLayer": lambda: new_kv_cache(model.config)}
    runs: Dict[str, Dict[str, List[float]]] = {str(length): {name: [] for name in caches} for length in LENGTHS}
    parity = True
    for round_index in range(args.rounds):
        for length in LENGTHS:
            names = list(caches) if round_index % 2 == 0 else list(reversed(caches))
            tokens = {}
            for name in names:
                step_ms, tokens[name] = _decode(model, caches[name](), length)
                runs[str(length)][name].append(step_ms)
                log(f"round {round_index + 1} {length} positions {name}: {step_ms:.1f} ms a step")
            parity = parity and torch.equal(tokens["DynamicLayer"], tokens["SpareRoomLayer"])
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": "SmolLM2-135M-Instruct (fp32)", "rows": ROWS,
              "decode_steps": DECODE_STEPS, "threads": torch.get_num_threads(), "rounds": args.rounds,
              "ms_per_step": runs, "same_tokens": parity}
    (args.out / "kv-append-benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", "kv-append", render(report))
    return 0


@torch.inference_mode()
def _decode(model: torch.nn.Module, cache: Any, length: int):
    ids = torch.randint(0, model.config.vocab_size, (ROWS, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones(ROWS, length, dtype=torch.long)
    positions = torch.arange(length).expand(ROWS, -1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    chosen = [out.logits[:, -1].argmax(-1, keepdim=True)]
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        mask = torch.cat([mask, torch.ones(ROWS, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=chosen[-1], attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        chosen.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return (time.perf_counter() - start) * 1000 / DECODE_STEPS, torch.cat(chosen, dim=1)


def render(report: Dict[str, Any]) -> str:
    lines = [f"{report['date']}: {report['model']}, {report['rows']} rows, {report['decode_steps']} greedy decode "
             f"steps after a prefill, {report['threads']} threads; median (min-max) of {report['rounds']} "
             f"round(s), the caches alternating. Same tokens from both: {report['same_tokens']}.", "",
             "| context (positions) | DynamicLayer, ms a step | SpareRoomLayer, ms a step "
             "| SpareRoomLayer / DynamicLayer |",
             "|---|---|---|---|"]
    for length, runs in report["ms_per_step"].items():
        plain, roomy = runs["DynamicLayer"], runs["SpareRoomLayer"]
        lines.append(f"| {length} | {median_range(plain, 1)} | {median_range(roomy, 1)} | "
                     f"{median_range(ratios(roomy, plain), 2)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
