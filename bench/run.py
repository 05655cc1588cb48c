"""`python -m bench.run` (`make bench`): measure ts_plugin's parallelTypes on this machine and write
docs/benchmarks.md and docs/benchmarks.png.

Every figure is the ratio of two things measured in the same run, interleaved (A, B, B, A, ...) so that
the noise of a shared machine falls on both sides; each is the median over repetitions, with min and max.

1. Parity: pp 2, tp 2, pptp 2x2 and custom through the real TorchServe vs single-process HF `generate`
   (greedy, one prompt at a time): identical text and token count on every prompt.
2. Serving overhead: latency of one request through TorchServe (tp 2) / the same request through the same
   handler class under torchrun without TorchServe (bench.driver).
3. Tensor-parallel efficiency: decode tokens/s of tp 2 (one thread per rank) / one process with two threads
   running the same generation loop.
4. Pipeline overlap: throughput of pp 2 on a batch of 4 prompts with pippy.chunks 4 / chunks 1 (the same
   loaded pipeline, chunks switched between runs).
5. Memory: peak RSS of each rank at load (VmHWM when READY) and while serving (sampled) / (model bytes /
   world size + RSS of a bare process that imported what that worker imports).
6. Start-up: registration -> READY per parallelType / `from_pretrained` of the same checkpoint.

`--smoke` runs everything once on a tiny model in ~2-3 minutes (CI: tests/test_bench_smoke.py).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import psutil
import requests
import yaml

from . import model as bench_model
from .procs import (REPO, BenchError, Driver, ForeignCpu, RssSampler, bare_rss, base_env, free_port,
                    kill_tree_list, memory_of, worker_ranks)
from .spy import profile_request

KINDS = ("pp", "tp", "pptp", "custom")
HANDLER_FILES = {"tp": "deepspeed_handler.py", "pp": "pipeline_handler.py", "pptp": "pptp_handler.py",
                 "custom": "accelerate_handler.py"}
WORLD = {"pp": 2, "tp": 2, "pptp": 4, "custom": 1}
#: registration order in each start-up round; tp last, so that the last round's tp stays up for figures 2-3
ORDER = ("custom", "pp", "pptp", "tp")


@dataclass
class Plan:
    smoke: bool
    model: Dict[str, int]
    parity_prompts: int
    parity_new_tokens: int
    startup_rounds: int
    pair_rounds: int
    latency_new_tokens: int
    batch_new_tokens: int
    prefill_prompt_words: int

    @classmethod
    def make(cls, smoke: bool, rounds: Optional[int] = None, pairs: Optional[int] = None) -> "Plan":
        if smoke:
            plan = cls(True, bench_model.SMOKE, 4, 8, 1, 1, 8, 8, 24)
        else:
            plan = cls(False, bench_model.FULL, 20, 16, 3, 8, 32, 32, 96)
        if rounds:
            plan.startup_rounds = rounds
        if pairs:
            plan.pair_rounds = pairs
        return plan


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_prompts(count: int, seed: int = 8) -> List[str]:
    """Distinct prompts of 3..14 words from the tokenizer's own corpus (so they tokenize into few tokens)."""
    from ts_plugin.tiny_model import _CORPUS

    words = _CORPUS.split()
    rng = random.Random(seed)
    prompts: List[str] = []
    while len(prompts) < count:
        length = rng.randint(3, 14)
        start = rng.randrange(0, len(words) - length)
        prompt = " ".join(words[start:start + length])
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


def long_prompt(words: int, seed: int) -> str:
    from ts_plugin.tiny_model import _CORPUS

    pool = _CORPUS.split()
    rng = random.Random(seed)
    return " ".join(rng.choice(pool) for _ in range(words))


def model_config(kind: str, model_dir: Path, max_new: int) -> Dict[str, Any]:
    """The example config of the parallelType (examples/<kind>/model-config.yaml) with the model folder, CPU, a
    rendezvous of its own and bounds that fit the benchmark."""
    config = yaml.safe_load((REPO / "examples" / kind / "model-config.yaml").read_text())
    config["deviceType"] = "cpu"
    config["responseTimeout"] = 600
    config["startupTimeout"] = 600
    if kind != "custom":
        config["torchrun"] = {**config.get("torchrun", {}), "rdzv-endpoint": f"127.0.0.1:{free_port()}"}
    config["handler"] = {**config.get("handler", {}), "model_path": str(model_dir), "max_new_tokens": max_new,
                         "max_length": 512}
    return config


def archive(store: Path, name: str, kind: str, config_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ts_plugin", "archive", "--model-name", name, "--version", "1.0",
         "--handler", str(REPO / "handlers" / HANDLER_FILES[kind]), "--config-file", str(config_path),
         "--export-path", str(store), "--archive-format", "no-archive", "--force"],
        capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise BenchError(f"archiving {name} failed:\n{result.stdout}\n{result.stderr}")


def unregister(ts, name: str, timeout: float = 120) -> None:
    """DELETE the model, then wait until its worker processes are gone (kill what is left after `timeout`)."""
    requests.delete(f"{ts.management_url}/models/{name}", timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker_ranks(ts.process.pid):
            return
        time.sleep(0.2)
    left = list(worker_ranks(ts.process.pid).values())
    log(f"{name}: {len(left)} worker process(es) still there {timeout:.0f} s after unregistering; killing them")
    kill_tree_list(left)


def post_all(ts, name: str, prompts: List[str], max_new: int) -> List[requests.Response]:
    bodies = [{"inputs": p, "parameters": {"max_new_tokens": max_new}} for p in prompts]
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: ts.predict(name, body, timeout=600), bodies))


FRESH_LOAD = ("import sys, torch, transformers; "
              "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
              "print('LOADED', flush=True)")


def fresh_from_pretrained(model_dir: Path) -> float:
    """Seconds from starting a plain Python process until `from_pretrained` of the checkpoint has returned."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", FRESH_LOAD, str(model_dir)], cwd=REPO, env=base_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    elapsed = float("nan")
    for line in proc.stdout:
        if line.startswith("LOADED"):
            elapsed = time.perf_counter() - started
            break
    proc.stdout.close()
    proc.wait(timeout=120)
    if elapsed != elapsed:
        raise BenchError(f"a fresh from_pretrained of {model_dir} failed (exit {proc.returncode})")
    return elapsed


def ts_metric_lines(log_dir: Path, since: float, model: str) -> Dict[str, List[float]]:
    """TorchServe's own per-request metrics for `model` logged at or after `since` (epoch s), in ms:
    PredictionTime per rank (worker: handle + TorchServe's Python service), the frontend's queue time
    (batch aggregation: maxBatchDelay) and its whole inference latency."""
    out: Dict[str, Any] = {"prediction_ms": [], "queue_ms": [], "frontend_ms": [], "prediction_by_request": {}}
    patterns = (("model_metrics.log", "PredictionTime.ms:", f"ModelName:{model},", "prediction_ms", 1.0),
                ("ts_metrics.log", "ts_queue_latency_microseconds.Microseconds:", f"model_name:{model},", "queue_ms",
                 1e-3),
                ("ts_metrics.log", "ts_inference_latency_microseconds.Microseconds:", f"model_name:{model},",
                 "frontend_ms", 1e-3))
    for file, prefix, tag, key, scale in patterns:
        try:
            lines = (log_dir / file).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if prefix not in line or tag not in line:
                continue
            try:
                value = float(line.split(prefix, 1)[1].split("|", 1)[0])
                stamp = float(line.rsplit("timestamp:", 1)[1].split(",")[0].split("|")[0])
            except (IndexError, ValueError):
                continue
            if stamp >= math.floor(since):
                out[key].append(value * scale)
                if key == "prediction_ms" and "requestID:" in line:
                    request = line.split("requestID:", 1)[1].split(",")[0]
                    out["prediction_by_request"].setdefault(request, []).append(value)
    return out


def decode_rate(result: Dict[str, Any], row: int = 0) -> float:
    """Decode tokens/s of one sequence: tokens after the first / time after the first (prefill excluded)."""
    tokens = len(result["token_ids"][row])
    seconds = result["gen_s"][row] - result["ttft_s"][row]
    return (tokens - 1) / seconds if tokens > 1 and seconds > 0 else float("nan")


def throughput(result: Dict[str, Any]) -> float:
    return sum(len(ids) for ids in result["token_ids"]) / result["seconds"]


class Bench:
    def __init__(self, plan: Plan, out: Path, workdir: Path):
        self.plan = plan
        self.out = out
        self.workdir = workdir
        self.model_dir = workdir / "model"
        self.results: Dict[str, Any] = {"plan": asdict(plan), "figures": {}, "details": {}}
        self.drivers: List[Driver] = []
        self.ts = None

    # --- phases ----------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        started = time.perf_counter()
        try:
            self.setup()
            self.startup_rounds()
            self.serving_pairs()
            self.profiles()
        finally:
            self.cleanup()
        self.results["wall_s"] = time.perf_counter() - started
        return self.results

    def setup(self) -> None:
        from ts_plugin._torchserve import TorchServe

        plan = self.plan
        log(f"model {plan.model} in {self.model_dir}")
        size = bench_model.make_model(self.model_dir, **plan.model)
        self.results["model"] = {**size, **plan.model, "dtype": "float32"}
        store = self.workdir / "store"
        store.mkdir(exist_ok=True)
        for kind in KINDS:
            path = self.workdir / f"{kind}.yaml"
            path.write_text(yaml.safe_dump(model_config(kind, self.model_dir, 64), sort_keys=False))
            archive(store, f"bench-{kind}", kind, path)
        # the in-process pp driver: chunks switched per run; a separate config file (no torchrun keys needed)
        (self.workdir / "pp-inproc.yaml").write_text(
            yaml.safe_dump(model_config("pp", self.model_dir, 64), sort_keys=False))
        (self.workdir / "tp-inproc.yaml").write_text(
            yaml.safe_dump(model_config("tp", self.model_dir, 64), sort_keys=False))
        log("starting TorchServe, the single-process reference and the bare-import baselines")
        self.ts = TorchServe(self.workdir / "ts", store)
        self.single = self._driver("single", ["single", "--model-dir", str(self.model_dir), "--threads", "2"],
                                   threads=2)
        with ThreadPoolExecutor(6) as pool:
            baselines = {kind: pool.submit(bare_rss, kind) for kind in KINDS}
            serving = pool.submit(self.ts.start, None, 300)
            self.single.wait_ready()
            serving.result()
            self.results["details"]["bare_rss_mib"] = {kind: future.result() for kind, future in baselines.items()}
        self.prompts = make_prompts(plan.parity_prompts)
        log(f"reference: HF generate, {len(self.prompts)} prompts x {plan.parity_new_tokens} new tokens")
        self.reference = self.single.call(op="reference", prompts=self.prompts, max_new_tokens=plan.parity_new_tokens)
        # the latency prompt: one whose greedy answer runs the full length (no early end of sequence)
        self.latency_prompt = None
        for prompt in make_prompts(12, seed=21):
            ref = self.single.call(op="reference", prompts=[prompt], max_new_tokens=plan.latency_new_tokens)
            if len(ref["token_ids"][0]) == plan.latency_new_tokens:
                self.latency_prompt = prompt
                break
        if self.latency_prompt is None:
            raise BenchError("no candidate prompt runs to max_new_tokens without an end-of-sequence token")
        self.batch_prompts = make_prompts(4, seed=33)
        self.prefill_prompts = [long_prompt(plan.prefill_prompt_words, seed) for seed in range(4)]

    def _driver(self, name: str, argv: List[str], nproc: int = 1, threads: int = 1) -> Driver:
        driver = Driver(name, self.workdir, argv, nproc=nproc, threads=threads)
        self.drivers.append(driver)
        return driver

    def startup_rounds(self) -> None:
        plan = self.plan
        startup: Dict[str, List[float]] = {kind: [] for kind in KINDS}
        loads: List[float] = []
        memory: Dict[str, List[Dict[str, Any]]] = {kind: [] for kind in KINDS}
        parity: Dict[str, Any] = {}
        fresh: List[float] = []
        for round_index in range(plan.startup_rounds):
            fresh.append(fresh_from_pretrained(self.model_dir))
            log(f"round {round_index + 1}/{plan.startup_rounds}: a fresh process runs from_pretrained in "
                f"{fresh[-1]:.1f} s (start, imports, load)")
            for kind in ORDER:
                name = f"bench-{kind}"
                loads.append(self.single.call(op="load_time")["seconds"])
                log(f"round {round_index + 1}/{plan.startup_rounds}: registering {kind} "
                    f"(from_pretrained took {loads[-1]:.2f} s)")
                started = time.perf_counter()
                self.ts.register(name, name, timeout=900)
                startup[kind].append(time.perf_counter() - started)
                ranks = worker_ranks(self.ts.process.pid)
                at_load = memory_of(ranks)
                if len(at_load) != WORLD[kind]:
                    raise BenchError(f"{kind}: expected {WORLD[kind]} worker ranks, found {sorted(at_load)}")
                prompts = self.prompts if round_index == 0 else self.prompts[:4]
                with RssSampler(ranks) as sampler:
                    responses = post_all(self.ts, name, prompts, plan.parity_new_tokens)
                bad = [r for r in responses if r.status_code != 200]
                if bad:
                    raise BenchError(f"{kind}: {bad[0].status_code} {bad[0].text}\n{self.ts.log_tail()}")
                if round_index == 0:
                    parity[kind] = self._parity(responses)
                memory[kind].append({"load_hwm_mib": {r: m["hwm_mib"] for r, m in at_load.items()},
                                     "serving_peak_mib": dict(sampler.peak)})
                log(f"{kind}: READY in {startup[kind][-1]:.1f} s; load peak RSS per rank "
                    f"{[round(at_load[r]['hwm_mib']) for r in sorted(at_load)]} MiB; serving peak "
                    f"{[round(sampler.peak[r]) for r in sorted(sampler.peak)]} MiB"
                    + (f"; parity {parity[kind]['identical']}/{parity[kind]['total']}" if round_index == 0 else ""))
                if not (kind == "tp" and round_index == plan.startup_rounds - 1):
                    unregister(self.ts, name)
        self.results["details"].update(startup_s=startup, from_pretrained_s=loads, fresh_from_pretrained_s=fresh,
                                       memory=memory, parity=parity)

    def _parity(self, responses: List[requests.Response]) -> Dict[str, Any]:
        identical, mismatches = 0, []
        for index, response in enumerate(responses):
            answer = response.json()
            expected_text = self.reference["texts"][index]
            expected_tokens = len(self.reference["token_ids"][index])
            same = (answer["generated_text"] == expected_text
                    and answer["details"]["completion_tokens"] == expected_tokens)
            identical += same
            if not same:
                mismatches.append({"prompt": self.prompts[index], "expected": expected_text,
                                   "got": answer["generated_text"]})
        return {"identical": identical, "total": len(responses), "mismatches": mismatches[:3]}

    def serving_pairs(self) -> None:
        plan = self.plan
        log("starting the in-process drivers: tp 2 and pp 2 under torchrun, without TorchServe")
        tp = self._driver("tp", ["handler", "--parallel", "tp", "--model-dir", str(self.model_dir),
                                 "--config", str(self.workdir / "tp-inproc.yaml")], nproc=2, threads=1)
        pp = self._driver("pp", ["handler", "--parallel", "pp", "--model-dir", str(self.model_dir),
                                 "--config", str(self.workdir / "pp-inproc.yaml")], nproc=2, threads=1)
        tp.wait_ready()
        pp.wait_ready()
        self.tp, self.pp = tp, pp
        n = plan.latency_new_tokens
        body = {"inputs": self.latency_prompt, "parameters": {"max_new_tokens": n}}
        # warm-up: first calls pay for lazy initialisation
        self.ts.predict("bench-tp", body, timeout=600)
        tp.call(op="generate", prompts=[self.latency_prompt], max_new_tokens=n)
        self.single.call(op="generate", prompts=[self.latency_prompt], max_new_tokens=n)
        pp.call(op="generate", prompts=self.batch_prompts, max_new_tokens=2, chunks=1)
        pp.call(op="stage_times")
        stage_calls: Dict[str, List[Any]] = {}
        time.sleep(1.0)  # TorchServe's metric timestamps are whole seconds: leave the warm-up request out
        since = time.time()
        samples: Dict[str, List[float]] = {key: [] for key in (
            "ts_latency_s", "inproc_latency_s", "tp_decode_tps", "single_decode_tps", "tp_gloo_decode_tps",
            "pp_c1_tps", "pp_c4_tps", "pp_c1_prefill_tps", "pp_c4_prefill_tps")}
        texts = set()

        frontend = next((p for p in psutil.Process(self.ts.process.pid).children(recursive=True)
                         if p.name().startswith("java")), None)
        me = psutil.Process()
        cpu: Dict[str, List[float]] = {"jvm_during_ts_s": [], "bench_during_ts_s": [], "jvm_during_inproc_s": [],
                                       "bench_during_inproc_s": []}

        def cpu_seconds(proc) -> float:
            try:
                times = proc.cpu_times()
                return times.user + times.system
            except (psutil.Error, AttributeError):
                return float("nan")

        def ts_request():
            jvm, mine = cpu_seconds(frontend), cpu_seconds(me)
            started = time.perf_counter()
            response = self.ts.predict("bench-tp", body, timeout=600)
            samples["ts_latency_s"].append(time.perf_counter() - started)
            cpu["jvm_during_ts_s"].append(cpu_seconds(frontend) - jvm)
            cpu["bench_during_ts_s"].append(cpu_seconds(me) - mine)
            if response.status_code != 200:
                raise BenchError(f"tp request failed: {response.status_code} {response.text}")
            texts.add(response.json()["generated_text"])

        def inproc_request():
            jvm, mine = cpu_seconds(frontend), cpu_seconds(me)
            result = tp.call(op="generate", prompts=[self.latency_prompt], max_new_tokens=n)
            cpu["jvm_during_inproc_s"].append(cpu_seconds(frontend) - jvm)
            cpu["bench_during_inproc_s"].append(cpu_seconds(me) - mine)
            samples["inproc_latency_s"].append(result["seconds"])
            samples["tp_decode_tps"].append(decode_rate(result))
            texts.add(result["texts"][0])

        def single_request():
            result = self.single.call(op="generate", prompts=[self.latency_prompt], max_new_tokens=n)
            samples["single_decode_tps"].append(decode_rate(result))
            texts.add(result["texts"][0])

        def tp_gloo_request():
            # diagnostic: the same with DeepSpeed's own layer forwards and all-reduce (gloo's) instead of the engine's
            result = tp.call(op="generate", prompts=[self.latency_prompt], max_new_tokens=n, allreduce="gloo")
            samples["tp_gloo_decode_tps"].append(decode_rate(result))

        def pp_batch(chunks: int, prefill: bool = False):
            prompts = self.prefill_prompts if prefill else self.batch_prompts
            result = pp.call(op="generate", prompts=prompts, max_new_tokens=1 if prefill else plan.batch_new_tokens,
                             chunks=chunks)
            key = f"pp_c{chunks}_{'prefill_' if prefill else ''}tps"
            samples[key].append(throughput(result))
            for entry in pp.call(op="stage_times")["ranks"]:
                stage_calls.setdefault(key, {}).setdefault(str(entry["rank"]), []).extend(entry["calls"])

        steps = [ts_request, inproc_request, single_request, tp_gloo_request, lambda: pp_batch(1),
                 lambda: pp_batch(4), lambda: pp_batch(1, True), lambda: pp_batch(4, True)]
        foreign: List[float] = []
        ts_ranks = worker_ranks(self.ts.process.pid)
        with RssSampler(ts_ranks, interval=0.2) as sampler:
            for index in range(plan.pair_rounds):
                loads = []
                for step in (steps if index % 2 == 0 else steps[::-1]):  # A B .. B A: drift falls on both sides
                    with ForeignCpu() as load:
                        step()
                    loads.append(load.cores)
                foreign.append(max(loads))
                log(f"figures 2-4: round {index + 1}/{plan.pair_rounds} done; other jobs used up to "
                    f"{foreign[-1]:.2f} cores during its steps")
        samples["foreign_cores"] = foreign
        self.results["details"]["tp_ts_peak_during_pairs_mib"] = dict(sampler.peak)
        self.results["details"]["tp_rank_memory"] = tp.call(op="memory")["ranks"]  # before the profiler's buffers
        self.results["details"]["pairs"] = samples
        self.results["details"]["latency_answers_identical"] = len(texts) == 1
        self.results["details"]["pp_stage_calls"] = stage_calls
        self.results["details"]["cpu_beside_requests"] = cpu
        self.results["details"]["ts_metrics"] = ts_metric_lines(self.ts.log_dir, since, "bench-tp")

    def profiles(self) -> None:
        """torch.profiler of one decode request on tp rank 0 (both paths) and in the single process,
        and gloo all-reduce vs exchange latency on the tp ranks: the evidence for figure 3."""
        log("profiles")
        n = self.plan.latency_new_tokens
        prof = {}
        self.results["details"]["profiles_foreign_cores"] = []
        for label, driver, extra in (("tp2 rank 0 (the engine's forwards and all-reduce)", self.tp, {}),
                                     ("tp2 rank 0 (DeepSpeed's forwards, gloo all-reduce)", self.tp,
                                      {"allreduce": "gloo"}),
                                     ("single process, 2 threads", self.single, {})):
            with ForeignCpu() as load:
                result = driver.call(op="generate", prompts=[self.latency_prompt], max_new_tokens=n, profile=True,
                                     **extra)
            self.results["details"]["profiles_foreign_cores"].append(load.cores)
            prof[label] = {**result["profile"], "decode_tps": decode_rate(result)}
        self.results["details"]["profiles"] = prof
        self.results["details"]["comm_bench"] = self.tp.call(op="comm_bench")["ranks"][0]
        # py-spy on rank 0 of TorchServe's tp worker and of the in-process tp job, one request each (figure 2)
        seconds = statistics.median(self.results["details"]["pairs"]["ts_latency_s"] or [5.0])
        body = {"inputs": self.latency_prompt, "parameters": {"max_new_tokens": n}}
        ts_rank0 = worker_ranks(self.ts.process.pid).get(0)
        driver_rank0 = next(r["pid"] for r in self.tp.call(op="memory")["ranks"] if r["rank"] == 0)
        spy = {}
        if ts_rank0 is not None:
            spy["TorchServe tp 2, rank 0"] = profile_request(
                ts_rank0.pid, lambda: self.ts.predict("bench-tp", body, timeout=600), seconds,
                self.workdir / "py-spy-ts.txt")
        spy["in-process tp 2, rank 0"] = profile_request(
            driver_rank0, lambda: self.tp.call(op="generate", prompts=[self.latency_prompt], max_new_tokens=n),
            seconds, self.workdir / "py-spy-inproc.txt")
        self.results["details"]["py_spy"] = spy

    def cleanup(self) -> None:
        for driver in self.drivers:
            try:
                driver.stop()
            except Exception as error:  # noqa: BLE001 - stop the rest
                log(f"stopping driver {driver.name}: {error}")
        if self.ts is not None:
            self.ts.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition, a few prompts (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where benchmarks.md/.png/.json go")
    parser.add_argument("--workdir", type=Path, help="models, archives and logs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--rounds", type=int, help="start-up rounds (default 3, smoke 1)")
    parser.add_argument("--pairs", type=int, help="rounds of figures 2-4 (default 8, smoke 1)")
    args = parser.parse_args(argv)
    plan = Plan.make(args.smoke, args.rounds, args.pairs)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ts_plugin-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"{'smoke' if plan.smoke else 'full'} run; work folder {workdir}; output {args.out}")
    try:
        results = Bench(plan, args.out, workdir).run()
        results["machine"] = {"cpus": _cpus(), "platform": platform.platform(), "python": platform.python_version(),
                              "date": time.strftime("%Y-%m-%d %H:%M")}
        results["versions"] = _versions()
        # the raw measurements first: a report that fails to render can be rendered again from them
        (args.out / "benchmarks.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        from .report import write_report

        write_report(results, args.out)
        log(f"wrote {args.out / 'benchmarks.md'} and benchmarks.png in {results['wall_s'] / 60:.1f} min")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "deepspeed", "accelerate", "torchserve"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


if __name__ == "__main__":
    sys.exit(main())
