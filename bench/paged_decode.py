"""What a decode step costs on the paged KV cache: ts_plugin's step (engines/_paged.py: one flat forward, decode
rows attended by the C++ kernel straight from the blocks) against the same rows through the gather path (each
row's blocks gathered, then the model's own sdpa) and against transformers' own DynamicCache (rows side by side
in one contiguous cache, as generate keeps them: the shape the step loop had before the paged cache).

In-process, the demo's real model (SmolLM2-135M, fp32): 8 rows prefilled to each context length, then
DECODE_STEPS greedy decode steps; the figure is ms per decode step. The three alternate within each round (in a
rotated order), and every round's tokens must be equal. Writes docs/paged-decode-benchmark.json and its block in
docs/benchmarks.md.

    python -m bench.paged_decode --rounds 3
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ts_plugin.engines import _cpu_kernels
from ts_plugin.engines._paged import NO_MASK, KVPool, PagedBatch, PagedRow, use_paged_attention

from .report import median_range, ratios, write_block
from .run import REPO, log

ROWS, DECODE_STEPS, BLOCK = 8, 32, 16
LENGTHS = (64, 512, 1024)
WAYS = ("DynamicCache", "paged, kernel", "paged, gather")


def in_process_args(doc: str, argv: Optional[List[str]]) -> argparse.Namespace:
    """The in-process benches' options (rounds, out); two threads, as a 2-CPU worker has."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    torch.set_num_threads(2)
    return parser.parse_args(argv)


def smollm2() -> torch.nn.Module:
    """The demo's real model, fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    from ts_plugin.testing.demo import prepare_smollm2

    return AutoModelForCausalLM.from_pretrained(prepare_smollm2(), dtype=torch.float32).eval()


def main(argv: Optional[List[str]] = None) -> int:
    args = in_process_args(__doc__, argv)
    plain, paged = smollm2(), smollm2()
    use_paged_attention(paged)
    kernel = _cpu_kernels.built()
    if kernel is None:
        raise SystemExit("the decode kernel did not build here; see the warning above")
    runs: Dict[str, Dict[str, List[float]]] = {str(length): {way: [] for way in WAYS} for length in LENGTHS}
    same = True
    for round_index in range(args.rounds):
        for length in LENGTHS:
            order = WAYS[round_index % 3:] + WAYS[:round_index % 3]
            tokens = {}
            for way in order:
                if way == "DynamicCache":
                    step_ms, tokens[way] = _decode_dynamic(plain, length)
                else:
                    _cpu_kernels.KERNELS[0] = kernel if way == "paged, kernel" else None
                    step_ms, tokens[way] = _decode_paged(paged, length)
                runs[str(length)][way].append(step_ms)
                log(f"round {round_index + 1} {length} positions {way}: {step_ms:.1f} ms a step")
            _cpu_kernels.KERNELS[0] = kernel
            same = same and all(torch.equal(tokens[WAYS[0]], tokens[way]) for way in WAYS[1:])
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": "SmolLM2-135M-Instruct (fp32)", "rows": ROWS,
              "decode_steps": DECODE_STEPS, "threads": torch.get_num_threads(), "rounds": args.rounds,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "ms_per_step": runs, "same_tokens": same}
    (args.out / "paged-decode-benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", "paged-decode", render(report))
    return 0


def _prompt(model: torch.nn.Module, length: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (ROWS, length), generator=torch.Generator().manual_seed(length))


@torch.inference_mode()
def _decode_dynamic(model: torch.nn.Module, length: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    mask = torch.ones(ROWS, length, dtype=torch.long)
    out = model(input_ids=_prompt(model, length), attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    chosen = [out.logits[:, -1].argmax(-1)]
    start = time.perf_counter()
    for step in range(DECODE_STEPS):
        mask = torch.cat([mask, torch.ones(ROWS, 1, dtype=torch.long)], dim=1)
        out = model(input_ids=chosen[-1].view(-1, 1), attention_mask=mask,
                    position_ids=torch.full((ROWS, 1), length + step), cache=cache, use_cache=True, logits_to_keep=1)
        chosen.append(out.logits[:, -1].argmax(-1))
    return (time.perf_counter() - start) * 1000 / DECODE_STEPS, torch.stack(chosen, dim=1)


def _decode_paged(model: torch.nn.Module, length: int,
                  forward: Optional[Callable[[torch.Tensor, PagedBatch], torch.Tensor]] = None):
    """Prefill ROWS rows to `length` positions, then DECODE_STEPS greedy steps; (ms a decode step, the tokens).
    `forward(ids, batch)` gives each row's last logits from the step's `[tokens]` ids (default: `model`'s paged
    forward)."""
    forward = forward or functools.partial(_paged_logits, model)
    per_row = -(-(length + DECODE_STEPS) // BLOCK)
    pool = KVPool(BLOCK)
    tables = [list(range(row * per_row, (row + 1) * per_row)) for row in range(ROWS)]

    def step(ids: torch.Tensor, rows: List[PagedRow]) -> torch.Tensor:
        return forward(ids.reshape(-1), PagedBatch(pool, rows)).argmax(-1)

    chosen = [step(_prompt(model, length), [PagedRow(table, length, length) for table in tables])]
    start = time.perf_counter()
    for index in range(DECODE_STEPS):
        chosen.append(step(chosen[-1], [PagedRow(table, length + index + 1, 1) for table in tables]))
    return (time.perf_counter() - start) * 1000 / DECODE_STEPS, torch.stack(chosen, dim=1)


@torch.inference_mode()
def _paged_logits(model: torch.nn.Module, ids: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    out = model(input_ids=ids.view(1, -1), position_ids=batch.position_ids, attention_mask=NO_MASK,
                use_cache=False, paged=batch, logits_to_keep=batch.last_tokens)
    return out.logits[0]


def render(report: Dict[str, Any]) -> str:
    lines = [f"{report['date']}: {report['model']}, {report['rows']} rows, {report['decode_steps']} greedy decode "
             f"steps after a prefill, {report['threads']} threads, CPU capability {report['cpu_capability']}; "
             f"median (min-max) of {report['rounds']} round(s), the three in a rotated order. Same tokens from all: "
             f"{report['same_tokens']}.", "",
             "| context (positions) | DynamicCache, ms a step | paged + kernel, ms | paged + gather, ms "
             "| kernel / DynamicCache | gather / DynamicCache |",
             "|---|---|---|---|---|---|"]
    for length, runs in report["ms_per_step"].items():
        dynamic, kernel, gather = (runs[way] for way in WAYS)
        lines.append(f"| {length} | {median_range(dynamic, 1)} | {median_range(kernel, 1)} | "
                     f"{median_range(gather, 1)} | {median_range(ratios(kernel, dynamic), 2)} | "
                     f"{median_range(ratios(gather, dynamic), 2)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
