"""`python -m bench.run` (`make bench`): measure ts_plugin's parallelTypes on this machine; writes
docs/benchmarks.json and the table and chart of docs/benchmarks.md (whose prose is written by hand).

Every figure is the ratio of two things measured in the same run, interleaved (A, B, B, A, ...) so that the
noise of a shared machine falls on both sides; each is the median over repetitions, with min and max. The
figures are listed, with how each is measured, in docs/benchmarks.md. `--smoke` runs everything once on a tiny
model in ~2 minutes (CI: tests/test_bench_smoke.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List, Optional

from ts_plugin.testing import TorchServe, archive_model, make_tiny_model, reference_answers, write_config
from ts_plugin.testing.tiny_model import _CORPUS

from .procs import REPO, BenchError, Driver, bare_rss, base_env, foreign_cpu, memory_of, peak_rss
from .report import WORLD, write_report

ORDER = ("custom", "pp", "pptp", "tp")  # per start-up round; tp last, so the last round's tp serves figure 2


#: the bench model: a random-weight Llama of about 200M parameters (18 layers of hidden 1024, 16 heads of 64, 4 KV
#: heads, MLP 2816) in 8 fp32 safetensors shards, or a tiny one for the smoke run (--smoke)
MODELS = {False: dict(layers=18, hidden=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                      shards=8),
          True: dict(layers=4, hidden=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     shards=2)}
#: the smoke run (a tiny model, once) and the full run
PLANS = {True: dict(parity_prompts=4, parity_new_tokens=8, startup_rounds=1, pair_rounds=1, latency_new_tokens=8,
                    batch_new_tokens=8, prefill_prompt_words=24),
         False: dict(parity_prompts=20, parity_new_tokens=16, startup_rounds=3, pair_rounds=8, latency_new_tokens=32,
                     batch_new_tokens=32, prefill_prompt_words=96)}


def make_model(path: Path, smoke: bool) -> Dict[str, Any]:
    """The bench model, made locally with ts_plugin.testing's tiny-model builder and tokenizer (nothing is
    downloaded): its spec, parameters and bytes."""
    make_tiny_model(path, "llama", max_position_embeddings=512, **MODELS[smoke])
    weights = sum(file.stat().st_size for file in Path(path).glob("*.safetensors"))  # fp32 (headers: a few KiB)
    return {**MODELS[smoke], "parameters": weights // 4, "bytes": weights}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_prompts(count: int, seed: int) -> List[str]:
    """Distinct prompts of 3..14 words from the tokenizer's own corpus (so they tokenize into few tokens)."""
    words, rng, prompts = _CORPUS.split(), random.Random(seed), []
    while len(prompts) < count:
        length = rng.randint(3, 14)
        start = rng.randrange(0, len(words) - length)
        prompt = " ".join(words[start:start + length])
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


def package(store: Path, name: str, kind: str, model_dir: Path, max_new: int = 64, **overrides) -> None:
    """Archive examples/<kind>/model-config.yaml with the model folder, CPU, a rendezvous of its own and bounds
    that fit (and `overrides`) as `name` into `store`."""
    handler = {"model_path": str(model_dir), "max_new_tokens": max_new, "max_length": 512,
               **overrides.pop("handler", {})}
    config = write_config(store.parent / f"{name}.yaml", REPO / "examples" / kind / "model-config.yaml",
                          deviceType="cpu", responseTimeout=600, startupTimeout=600, handler=handler, **overrides)
    archive_model(store, name, config)


def fresh_from_pretrained(model_dir: Path) -> float:
    """Seconds from starting a plain Python process until `from_pretrained` of the checkpoint has returned."""
    code = ("import sys, torch, transformers; "
            "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); print('LOADED')")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(model_dir)], cwd=REPO, env=base_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    loaded = any(line.startswith("LOADED") for line in proc.stdout)
    elapsed = time.perf_counter() - started
    if proc.wait(timeout=120) != 0 or not loaded:
        raise BenchError(f"a fresh from_pretrained of {model_dir} failed (exit {proc.returncode})")
    return elapsed


def decode_rate(result: Dict[str, Any]) -> float:
    """Decode tokens/s of the first sequence: tokens after the first / time after the first."""
    tokens, seconds = len(result["token_ids"][0]), result["gen_s"][0] - result["ttft_s"][0]
    return (tokens - 1) / seconds if tokens > 1 and seconds > 0 else float("nan")


def throughput(result: Dict[str, Any]) -> float:
    return sum(len(ids) for ids in result["token_ids"]) / result["seconds"]


class Bench:
    def __init__(self, smoke: bool, workdir: Path):
        self.plan = SimpleNamespace(smoke=smoke, **PLANS[smoke])
        self.workdir, self.model_dir = workdir, workdir / "model"
        self.results: Dict[str, Any] = {"plan": {"smoke": smoke, **PLANS[smoke]}}
        self.drivers: List[Driver] = []
        self.ts: Optional[TorchServe] = None

    def run(self) -> Dict[str, Any]:
        started = time.perf_counter()
        try:
            self.setup()
            self.startup_rounds()
            self.side_by_side()
        finally:
            for driver in self.drivers:
                driver.stop()
            if self.ts is not None:
                self.ts.stop()
        self.results["wall_s"] = time.perf_counter() - started
        return self.results

    def setup(self) -> None:
        plan = self.plan
        log(f"model {MODELS[plan.smoke]} in {self.model_dir}")
        self.results["model"] = make_model(self.model_dir, plan.smoke)
        store = self.workdir / "store"
        for kind in WORLD:  # the rounds repeat their prompts: prefix hits would skip the prefills they time
            package(store, f"bench-{kind}", kind, self.model_dir, handler={"enable_prefix_caching": False})
        log("starting TorchServe and the bare-import baselines; HF generate's answers")
        self.ts = TorchServe(self.workdir / "ts", store)
        with ThreadPoolExecutor(6) as pool:
            baselines = {kind: pool.submit(bare_rss, kind) for kind in WORLD}
            serving = pool.submit(self.ts.start, None, 300)
            self.prompts = make_prompts(plan.parity_prompts, seed=8)
            candidates = make_prompts(12, seed=21)
            self.reference = reference_answers(self.model_dir, [(p, plan.parity_new_tokens) for p in self.prompts])
            lengths = reference_answers(self.model_dir, [(p, plan.latency_new_tokens) for p in candidates])
            serving.result()
            self.results["bare_rss_mib"] = {kind: future.result() for kind, future in baselines.items()}
        # the latency prompt: one whose greedy answer runs the full length (no early end of sequence)
        self.latency_prompt = next((prompt for prompt, (ids, _) in zip(candidates, lengths)
                                    if len(ids) == plan.latency_new_tokens), None)
        if self.latency_prompt is None:
            raise BenchError("no candidate prompt runs to max_new_tokens without an end-of-sequence token")
        self.batch_prompts = make_prompts(4, seed=33)
        pool = _CORPUS.split()
        self.prefill_prompts = [" ".join(random.Random(seed).choice(pool) for _ in range(plan.prefill_prompt_words))
                                for seed in range(4)]

    def startup_rounds(self) -> None:
        """Figures 1, 5 and 6: register each parallelType (READY time, memory at load), serve the parity prompts
        (memory while serving; answers against HF generate in the first round), unregister."""
        plan = self.plan
        startup: Dict[str, List[float]] = {kind: [] for kind in WORLD}
        memory: Dict[str, List[Dict[str, Any]]] = {kind: [] for kind in WORLD}
        parity, fresh = {}, []
        for round_index in range(plan.startup_rounds):
            fresh.append(fresh_from_pretrained(self.model_dir))
            for kind in ORDER:
                name = f"bench-{kind}"
                started = time.perf_counter()
                self.ts.register(name, name, timeout=900)
                startup[kind].append(time.perf_counter() - started)
                ranks = self.ts.workers()
                at_load = memory_of(ranks)
                if len(at_load) != WORLD[kind]:
                    raise BenchError(f"{kind}: expected {WORLD[kind]} worker ranks, found {sorted(at_load)}")
                prompts = self.prompts if round_index == 0 else self.prompts[:4]
                bodies = [{"inputs": p, "parameters": {"max_new_tokens": plan.parity_new_tokens}} for p in prompts]
                with peak_rss(ranks) as peak, ThreadPoolExecutor(len(bodies)) as pool:
                    responses = list(pool.map(lambda body: self.ts.predict(name, body, timeout=600), bodies))
                bad = [r for r in responses if r.status_code != 200]
                if bad:
                    raise BenchError(f"{kind}: {bad[0].status_code} {bad[0].text}\n{self.ts.log_tail()}")
                if round_index == 0:
                    parity[kind] = [r.json()["generated_text"] == text and r.json()["details"]["completion_tokens"]
                                    == len(ids) for r, (ids, text) in zip(responses, self.reference)]
                memory[kind].append({"load_hwm_mib": [at_load[r]["hwm_mib"] for r in sorted(at_load)],
                                     "serving_peak_mib": [peak.get(r, 0.0) for r in sorted(at_load)]})
                log(f"round {round_index + 1}/{plan.startup_rounds} {kind}: READY in {startup[kind][-1]:.1f} s; "
                    f"peak RSS per rank {memory[kind][-1]} MiB")
                if not (kind == "tp" and round_index == plan.startup_rounds - 1):
                    self.ts.unregister(name)
        self.results.update(startup_s=startup, fresh_from_pretrained_s=fresh, memory=memory, parity=parity)

    def side_by_side(self) -> None:
        """Figures 2-4, interleaved rounds: TorchServe against the same handler under torchrun, tp 2 against one
        process, pp chunks 4 against 1."""
        plan, n = self.plan, self.plan.latency_new_tokens
        log("starting the in-process drivers: tp 2 and pp 2 under torchrun, custom in one process with 2 threads")
        self.drivers = [Driver(kind, self.workdir, ["--config", str(self.workdir / f"bench-{kind}.yaml"), "--threads",
                                                    str(threads)], nproc, threads)
                        for kind, nproc, threads in (("tp", 2, 1), ("pp", 2, 1), ("custom", 1, 2))]
        for driver in self.drivers:
            driver.wait_ready()
        tp, pp, single = self.drivers
        body = {"inputs": self.latency_prompt, "parameters": {"max_new_tokens": n}}
        one = {"op": "generate", "prompts": [self.latency_prompt], "max_new_tokens": n}
        for warm_up in (lambda: self.ts.predict("bench-tp", body, timeout=600), lambda: tp.call(**one),
                        lambda: single.call(**one)):
            warm_up()
        samples: Dict[str, List[float]] = {}
        texts = set()

        def ts_request():
            started = time.perf_counter()
            response = self.ts.predict("bench-tp", body, timeout=600)
            samples.setdefault("ts_latency_s", []).append(time.perf_counter() - started)
            if response.status_code != 200:
                raise BenchError(f"tp request failed: {response.status_code} {response.text}")
            texts.add(response.json()["generated_text"])

        def driver_request(key: str, driver: Driver, **extra):
            def request():
                result = driver.call(**one, **extra)
                samples.setdefault(f"{key}_decode_tps", []).append(decode_rate(result))
                if key == "tp":
                    samples.setdefault("inproc_latency_s", []).append(result["seconds"])
                texts.add(result["texts"][0])
            return request

        def pp_batch(chunks: int, prefill: bool):
            def request():
                result = pp.call(op="generate", prompts=self.prefill_prompts if prefill else self.batch_prompts,
                                 max_new_tokens=1 if prefill else plan.batch_new_tokens, chunks=chunks)
                samples.setdefault(f"pp_c{chunks}{'_prefill' if prefill else ''}_tps", []).append(throughput(result))
            return request

        steps = [ts_request, driver_request("tp", tp), driver_request("single", single),
                 driver_request("tp_deepspeed_forwards", tp, deepspeed_forwards=True),
                 pp_batch(1, False), pp_batch(4, False), pp_batch(1, True), pp_batch(4, True)]
        foreign = []
        for index in range(plan.pair_rounds):
            loads = []
            for step in (steps if index % 2 == 0 else steps[::-1]):  # A B .. B A: drift falls on both sides
                with foreign_cpu() as cores:
                    step()
                loads.append(cores[0])
            foreign.append(max(loads))
            log(f"figures 2-4: round {index + 1}/{plan.pair_rounds}; other jobs used up to {foreign[-1]:.2f} cores")
        self.results.update(pairs=samples, foreign_cores=foreign, latency_answers_identical=len(texts) == 1)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition, a few prompts (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where benchmarks.md/.png/.json go")
    parser.add_argument("--workdir", type=Path, help="models, archives and logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ts_plugin-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"{'smoke' if args.smoke else 'full'} run; work folder {workdir}; output {args.out}")
    try:
        results = Bench(args.smoke, workdir).run()
        results["machine"] = {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                              "date": time.strftime("%Y-%m-%d %H:%M"),
                              **{name: version(name) for name in
                                 ("torch", "transformers", "deepspeed", "accelerate", "torchserve")}}
        # the raw measurements first: a report that fails to render can be rendered again from them
        (args.out / "benchmarks.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        write_report(results, args.out)
        log(f"wrote {args.out / 'benchmarks.md'} in {results['wall_s'] / 60:.1f} min")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
