"""What logprobs cost the engine and the handler, in one process, away from the served benchmark's noise: the
custom engine's step model (SmolLM2-135M, fp32, lm_head through oneDNN) streams 8 rows of 96 new tokens (no end
of sequence, so both loads have the same tokens), each step's output formatted as OpenAI's completions event
(the handler's work per token), plain against every row asking for `logprobs: 5`. Rounds alternate the order.
The issue's target: logprobs >= 0.95x plain. A ratio is invalid when plain's own rounds spread more than 10%.

    python -m bench.logprobs_cost --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import List, Optional

from .report import median_range, ratios, write_block
from .run import REPO, log

ROWS, NEW_TOKENS, TARGET, SPREAD = 8, 96, 0.95, 0.10


def _load():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.engines._onednn_head import use_onednn_head
    from ts_plugin.engines.base import HFStepModel
    from ts_plugin.testing.demo import prepare_smollm2

    path = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    use_onednn_head(model)
    return HFStepModel(model, torch.device("cpu")), tokenizer


def _rate(step_model, tokenizer, logprobs: Optional[int]) -> tuple:
    """Completion tokens/s of one streamed batch, and its token ids."""
    from ts_plugin.continuous import generate
    from ts_plugin.handlers._openai import OpenAIFormat
    from ts_plugin.requests import SamplingParams, TextRequest

    prompts = [tokenizer(f"Question {i}: tell me about the number {i * 7}.")["input_ids"] for i in range(ROWS)]
    params = [SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=logprobs) for _ in prompts]
    formats = [OpenAIFormat(TextRequest("", p, stream=True, api="v1/completions"), str(i), "bench", tokenizer)
               for i, p in enumerate(params)]
    events = []

    def on_step(row, output):
        events.append(formats[row].event(output.text, output.result, output.logprobs))

    started = time.perf_counter()
    results = generate(step_model, tokenizer, prompts, params, 42, [], on_step=on_step)
    took = time.perf_counter() - started
    return sum(len(r.token_ids) for r in results) / took, [r.token_ids for r in results]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.logprobs_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    step_model, tokenizer = _load()
    _rate(step_model, tokenizer, None)  # warm-up, unmeasured
    rates = {"plain": [], "logprobs_5": []}
    tokens = {}
    for index in range(args.rounds):
        for name in (("plain", "logprobs_5") if index % 2 == 0 else ("logprobs_5", "plain")):
            rate, tokens[name] = _rate(step_model, tokenizer, 5 if name == "logprobs_5" else None)
            rates[name].append(rate)
            log(f"round {index + 1}: {name} {rate:.1f} tok/s")
    report = {"when": time.strftime("%Y-%m-%d %H:%M"), "rows": ROWS, "new_tokens": NEW_TOKENS, "rates": rates,
              "same_tokens": tokens["plain"] == tokens["logprobs_5"]}
    (args.out / "logprobs-cost-benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", "logprobs-cost", render(report))
    print(render(report))
    return 0


def render(report: dict) -> str:
    plain, logprobs = report["rates"]["plain"], report["rates"]["logprobs_5"]
    spread = (max(plain) - min(plain)) / min(plain)
    ratio = statistics.median(ratios(logprobs, plain))
    if spread > SPREAD:
        verdict = f"invalid: plain moved {spread:.0%}"
    else:
        verdict = "met" if ratio >= TARGET else "missed"
    return (f"{report['when']}: {report['rows']} rows x {report['new_tokens']} new tokens, streamed and formatted as "
            f"OpenAI completions events, in one process; {len(plain)} rounds, order alternating.\n\n"
            "| rows ask for | tok/s, median (min-max) | ratio to plain, median (min-max) | target | verdict |\n"
            "|---|---|---|---|---|\n"
            f"| nothing (plain) | {median_range(plain, 1)} | | | |\n"
            f"| logprobs: 5 | {median_range(logprobs, 1)} | {median_range(ratios(logprobs, plain), 3)} "
            f"| >= {TARGET} | {verdict} |\n\n"
            f"Same tokens with and without logprobs: {'yes' if report['same_tokens'] else 'NO'}.")


if __name__ == "__main__":
    raise SystemExit(main())
