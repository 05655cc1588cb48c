"""A long prompt joins running streams: how long do they stop? Chunked prefill (handler.max_num_batched_tokens)
against prefilling the prompt whole.

Per server (custom, continuous batching, batchSize 8, the demo's real model): 4 streams of STREAM_TOKENS greedy
tokens run through OpenAI's streaming v1/completions; once each has streamed a few tokens, a prompt of about
2,000 tokens joins, asking 8 tokens. Figures: the largest gap between two tokens of a running stream while the
long prompt prefills (from its send to its first token), over the median gap of those streams outside that
window; the long prompt's time to first token; parity of every answer with single-process generate. Servers
run alone, one after another, in interleaved rounds (A B C, C B A, ...); the table gives the median with
min-max. Writes docs/long-prompt-benchmark.json and its block in docs/benchmarks.md.

    python -m bench.long_prompt --rounds 3
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import requests

from ts_plugin.testing import TorchServe, reference_answers

from .report import median_range, write_block
from .run import REPO, log, package

#: name -> handler.max_num_batched_tokens (None: every prompt prefilled whole)
SERVERS = {"whole": None, "chunked-256": 256, "chunked-128": 128, "chunked-64": 64, "chunked-32": 32}
STREAM_TOKENS = 160
RUNNING = 4
LONG_TOKENS = 8
LONG_PROMPT = ("Serving a model too large for one device means splitting it across processes, keeping every rank "
               "in step and answering each request as if one process had computed it. ")


def long_prompt(tokenizer, target: int = 2000) -> str:
    text = ""
    while len(tokenizer(text)["input_ids"]) < target:
        text += LONG_PROMPT
    return text


def stream_times(url: str, body: Dict[str, Any], headers: Dict[str, str]) -> Dict[str, Any]:
    """A streamed greedy completion: the arrival time of each piece of text, and the whole text."""
    sent, times, text = time.perf_counter(), [], ""
    with requests.post(url, json={**body, "stream": True, "temperature": 0}, headers=headers, stream=True,
                       timeout=1800) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            piece = "".join(choice.get("text") or "" for choice in json.loads(line[6:]).get("choices") or [])
            if piece:
                times.append(time.perf_counter())
                text += piece
    return {"sent": sent, "times": times, "text": text}


def run_once(url: str, model: str, prompts: List[str], long_text: str, headers: Dict[str, str]) -> Dict[str, Any]:
    streams: List[Optional[Dict[str, Any]]] = [None] * len(prompts)

    def run(index: int) -> None:
        streams[index] = stream_times(url, {"model": model, "prompt": prompts[index], "max_tokens": STREAM_TOKENS},
                                      headers)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    time.sleep(3.0)  # the streams are decoding
    joined = stream_times(url, {"model": model, "prompt": long_text, "max_tokens": LONG_TOKENS}, headers)
    for thread in threads:
        thread.join()
    window = (joined["sent"], joined["times"][0])
    during, outside = [], []
    for stream in streams:
        for before, after in zip(stream["times"], stream["times"][1:]):
            (during if after > window[0] and before < window[1] else outside).append(after - before)
    median = statistics.median(outside)
    return {"ttft_s": window[1] - window[0], "max_gap_s": max(during) if during else 0.0, "median_gap_s": median,
            "gap_ratio": (max(during) if during else 0.0) / median,
            "texts": [stream["text"] for stream in streams] + [joined["text"]]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.long_prompt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from ts_plugin.testing.demo import prepare_smollm2

    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    long_text = long_prompt(tokenizer)
    prompts = ["the quick brown fox jumps over the lazy dog .", "hello world ! how are you today ?",
               "a request carries a prompt and parameters ,", "tokens flow through stages ; ranks agree on every step ."]
    prompts = prompts[:RUNNING]
    workdir = Path(tempfile.mkdtemp(prefix="ts_plugin-long-prompt-"))
    store = workdir / "store"
    for name, budget in SERVERS.items():
        package(store, name, "custom", model_dir, STREAM_TOKENS, maxBatchDelay=50, batchSize=8,
                continuousBatching=True, handler={"max_num_batched_tokens": budget, "max_length": 4096})
    expected = [text for _, text in reference_answers(model_dir, [(p, STREAM_TOKENS) for p in prompts]
                                                      + [(long_text, LONG_TOKENS)])]
    log(f"long prompt: {len(tokenizer(long_text)['input_ids'])} tokens; {args.rounds} round(s) of {list(SERVERS)}")
    runs: Dict[str, List[Dict[str, Any]]] = {}
    with TorchServe(workdir / "ts", store) as ts:
        ts.start(models={})
        headers = ts._headers()
        for round_index in range(args.rounds):
            order = list(SERVERS) if round_index % 2 == 0 else list(reversed(SERVERS))
            for name in order:
                ts.register(name, name)
                url = f"{ts.inference_url}/predictions/{name}/1.0/v1/completions"
                stream_times(url, {"model": name, "prompt": prompts[0], "max_tokens": 2}, headers)  # warm-up
                run = run_once(url, name, prompts, long_text, headers)
                run["exact"] = run.pop("texts") == expected
                runs.setdefault(name, []).append(run)
                log(f"{name}: gap ratio {run['gap_ratio']:.1f} (max {run['max_gap_s']:.2f} s, median "
                    f"{run['median_gap_s']:.3f} s), TTFT {run['ttft_s']:.1f} s, exact {run['exact']}")
                ts.unregister(name)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": "SmolLM2-135M-Instruct (fp32)",
              "long_prompt_tokens": len(tokenizer(long_text)["input_ids"]), "running_streams": RUNNING,
              "stream_tokens": STREAM_TOKENS, "rounds": args.rounds, "runs": runs}
    (args.out / "long-prompt-benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_block(args.out / "benchmarks.md", "long-prompt", render(report))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def render(report: Dict[str, Any]) -> str:
    lines = [f"{report['date']}: a {report['long_prompt_tokens']}-token prompt joins {report['running_streams']} "
             f"running streams ({report['model']}, custom, continuous batching, batchSize 8); median (min-max) of "
             f"{report['rounds']} interleaved round(s).", "",
             "| server | max_num_batched_tokens | largest gap / median gap | largest gap (s) | median gap (s) | "
             "long prompt TTFT (s) | all answers exact |", "|---|---|---|---|---|---|---|"]
    for name, runs in report["runs"].items():
        lines.append(f"| {name} | {SERVERS.get(name) or 'null (whole prompts)'} | {median_range([r['gap_ratio'] for r in runs], 1)} | "
                     f"{median_range([r['max_gap_s'] for r in runs], 2)} | {median_range([r['median_gap_s'] for r in runs], 3)} | "
                     f"{median_range([r['ttft_s'] for r in runs], 1)} | {all(r['exact'] for r in runs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
