"""A model held in a process of its own, driven by command files: the "without TorchServe" side of the benchmark.

    python -m bench.driver single  --model-dir M --jobdir J --threads 2
    torchrun --nproc-per-node 2 -m bench.driver handler --parallel tp --model-dir M --config C --jobdir J

`handler`: ts_plugin's own handler class for the parallelType, initialized with a fake TorchServe context (as
tests/test_pipeline_engine.py does) and called with `handle(rows, context)` exactly as TorchServe's worker would:
the same engine, the same generation loop, only no frontend, no socket protocol and no batching delay.
`single`: one process, HF `from_pretrained` + the same `ts_plugin.generation.generate` loop (HFStepModel), and
HF `generate` as the ground truth for parity.

Protocol: rank 0 polls `J/cmd-0001.json`, `cmd-0002.json`, ... (written atomically by bench.procs.Driver), hands
each command to the other ranks over a gloo group with a long timeout (idle ranks block without spinning),
every rank executes it, and rank 0 writes `J/res-NNNN.json`. `J/ready.json` says the model is loaded.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

HANDLERS = {
    "tp": ("ts_plugin.handlers.tensor_parallel", "DeepSpeedHandler"),
    "pp": ("ts_plugin.handlers.pipeline", "PipelineHandler"),
    "pptp": ("ts_plugin.handlers.pipeline_tensor_parallel", "PipelineTensorParallelHandler"),
    "custom": ("ts_plugin.handlers.device_map", "DeviceMapHandler"),
}
POLL_S = 0.02
# profiler op names, lower case: DeepSpeed's RowParallel autograd function waits for its all-reduce inside
COMMUNICATION = ("gloo", "c10d", "rowparallel", "all_reduce", "allreduce", "broadcast", "recv", "send", "all_gather",
                 "allgather")
MATMUL = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm", "aten::_scaled_dot_product",
          "aten::baddbmm")


def proc_memory(pid: Optional[int] = None) -> Dict[str, float]:
    """VmRSS (now), VmHWM (peak so far) and the anonymous / file-backed parts of VmRSS of a process, in MiB,
    from /proc (Linux)."""
    values = {}
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) / 1024
    return {"rss_mib": values.get("VmRSS", 0.0), "hwm_mib": values.get("VmHWM", 0.0),
            "anon_mib": values.get("RssAnon", 0.0), "file_mib": values.get("RssFile", 0.0)}


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


class Context(SimpleNamespace):
    """What TorchServe's worker hands a handler (the parts ts_plugin uses)."""

    def set_response_status(self, code, phrase, idx=0):
        self.statuses[idx] = code

    def set_response_content_type(self, idx, value):
        pass


def op_summary(prof, wall_s: float, top: int = 14) -> Dict[str, Any]:
    """torch.profiler: self CPU time per op (top ops) and per category, as fractions of the wall time."""
    rows = []
    categories: Dict[str, float] = {}
    for event in prof.key_averages():
        self_us = event.self_cpu_time_total
        rows.append({"name": event.key, "self_ms": self_us / 1000, "calls": event.count})
        name = event.key.lower()
        if any(word in name for word in COMMUNICATION):
            cat = "communication: collectives and waiting for them"
        elif any(word in name for word in MATMUL):
            cat = "matrix multiply / attention kernels"
        else:
            cat = "other aten ops"
        categories[cat] = categories.get(cat, 0.0) + self_us / 1000
    rows.sort(key=lambda row: -row["self_ms"])
    accounted = sum(categories.values())
    categories["python / framework overhead (not in an op)"] = max(0.0, wall_s * 1000 - accounted)
    return {"wall_ms": wall_s * 1000, "top": rows[:top], "categories": categories}


class Job:
    def __init__(self, args):
        import torch
        import torch.distributed as dist

        self.args = args
        self.torch, self.dist = torch, dist
        self.jobdir = Path(args.jobdir)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.group = None
        self.stage_calls: List[List[float]] = []
        if args.threads:
            torch.set_num_threads(args.threads)
        started = time.perf_counter()
        if args.kind == "single":
            self._load_single()
        else:
            self._load_handler()
        self.load_s = time.perf_counter() - started
        if self.world > 1:
            # commands travel on a group of their own: an idle rank waits in it for as long as the benchmark
            # does something else, which the handler's process group (responseTimeout) would not allow
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))

    # --- loading -------------------------------------------------------------------------------------------------
    def _load_single(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from ts_plugin.engines.base import HFStepModel

        self.model = AutoModelForCausalLM.from_pretrained(self.args.model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.args.model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = GenerationConfig.from_pretrained(self.args.model_dir).eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.step = HFStepModel(self.model, torch.device("cpu"))

    def _load_handler(self) -> None:
        import importlib

        import yaml

        module, name = HANDLERS[self.args.parallel]
        config = yaml.safe_load(Path(self.args.config).read_text())
        self.context = Context(system_properties={"model_dir": self.args.model_dir}, manifest={"model": {}},
                               model_yaml_config=config, metrics=None, request_ids={}, statuses={})
        self.handler = getattr(importlib.import_module(module), name)()
        self.handler.initialize(self.context)  # pp: ranks 1.. start their follower loop here
        self._time_stage_runs()

    def _time_stage_runs(self) -> None:
        """pp: record (rows, tokens, seconds) of every stage.run on this rank, for the overlap analysis."""
        stage = getattr(self.handler.model or self.handler.follower, "stage", None)
        if stage is None or not hasattr(stage, "run"):
            return
        run = stage.run

        def timed(inputs, *args, **kwargs):
            started = time.perf_counter()
            out = run(inputs, *args, **kwargs)
            self.stage_calls.append([int(inputs.shape[0]), int(inputs.shape[1]), time.perf_counter() - started])
            return out

        stage.run = timed

    # --- commands ------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        import torch.distributed as dist

        if self.rank == 0:
            info = {"load_s": self.load_s, "world": self.world}
            write_json(self.jobdir / "ready.json", info)
        index = 0
        while True:
            index += 1
            command = None
            if self.rank == 0:
                path = self.jobdir / f"cmd-{index:04d}.json"
                while not path.exists():
                    time.sleep(POLL_S)
                command = json.loads(path.read_text())
            if self.world > 1:
                box = [command]
                dist.broadcast_object_list(box, src=0, group=self.group)
                command = box[0]
            try:
                result = {"ok": True, **(self.execute(command) or {})}
            except Exception as error:  # noqa: BLE001 - reported to the benchmark, which raises
                result = {"ok": False, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
            if self.world > 1 and command["op"] in ("memory", "stage_times", "comm_bench"):
                gathered = [None] * self.world if self.rank == 0 else None
                dist.gather_object(result.get("mine"), gathered, dst=0, group=self.group)
                result["ranks"] = gathered
            elif command["op"] in ("memory", "stage_times", "comm_bench"):
                result["ranks"] = [result.get("mine")]
            if self.rank == 0:
                write_json(self.jobdir / f"res-{index:04d}.json", result)
            if command["op"] == "stop":
                return

    def execute(self, command: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        op = command["op"]
        if op == "stop":
            if self.args.kind == "handler" and self.args.parallel == "pp" and self.rank == 0:
                self.handler.shutdown()
            return None
        if op == "memory":
            return {"mine": {"rank": self.rank, "pid": os.getpid(), **proc_memory()}}
        if op == "stage_times":
            calls, self.stage_calls = self.stage_calls, []
            return {"mine": {"rank": self.rank, "calls": calls}}
        if op == "generate":
            return self.generate(command)
        if op == "reference":
            return self.reference(command)
        if op == "load_time":
            return self.load_time()
        if op == "comm_bench":
            return {"mine": self.comm_bench()}
        raise ValueError(f"unknown op {op!r}")

    def generate(self, command: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        if command.get("allreduce") == "gloo":
            # tp: this request as DeepSpeed ships it: its own layer forwards and inference all-reduce (gloo's
            # allreduce), every rank alike
            from ts_plugin.engines._cpu_tp import deepspeed_layer_forwards

            with deepspeed_layer_forwards(self.handler.model.model):
                return self._maybe_profiled(command)
        return self._maybe_profiled(command)

    def comm_bench(self, rounds: int = 7, iterations: int = 30) -> Dict[str, Any]:
        """Latency of gloo's allreduce and of the tp engine's all-reduce on a decode step's tensor (1 x hidden),
        alternating, median per call in microseconds."""
        import statistics

        import torch
        import torch.distributed as dist

        out: Dict[str, Any] = {}
        if self.world != 2:
            return out
        hidden = self.handler.hf_config().hidden_size
        import deepspeed.comm.comm as ds_comm

        engine_all_reduce = ds_comm.cdb.inference_all_reduce
        conn = self._socket_pair()
        for label, size in (("decode step (1 x hidden)", hidden), ("4 x 64 tokens", 4 * 64 * hidden)):
            tensor = torch.randn(size)
            nbytes = size * 4

            def socket_exchange():
                # for comparison only: the same exchange through a Unix socket between the two ranks
                conn.sendall(tensor.numpy().tobytes())
                buffer = bytearray(nbytes)
                view, got = memoryview(buffer), 0
                while got < nbytes:
                    got += conn.recv_into(view[got:])
                tensor.add_(torch.frombuffer(buffer, dtype=torch.float32))

            functions = [("gloo allreduce", lambda: dist.all_reduce(tensor)),
                         ("engine all-reduce", lambda: engine_all_reduce(tensor, ds_comm.ReduceOp.SUM))]
            if nbytes <= 64 * 1024:  # both ranks send before they receive: must fit the socket buffers
                functions.append(("Unix socket exchange", socket_exchange))
            times: Dict[str, List[float]] = {name: [] for name, _ in functions}
            for _ in range(rounds):
                for name, fn in functions:
                    dist.barrier(group=self.group)
                    started = time.perf_counter()
                    for _ in range(iterations):
                        fn()
                    times[name].append((time.perf_counter() - started) / iterations * 1e6)
            out[f"{label}, {size * 4 / 1024:g} KiB"] = {name: statistics.median(v) for name, v in times.items()}
        return out

    def _socket_pair(self):
        """A Unix stream socket between rank 0 and rank 1 (abstract name, unique per job)."""
        import socket

        import torch.distributed as dist

        name = f"\0ts_plugin-bench-{os.environ.get('MASTER_PORT', '0')}"  # the job's own rendezvous port
        if self.rank == 0:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(name)
            server.listen(1)
            dist.barrier(group=self.group)
            conn, _ = server.accept()
            server.close()
        else:
            dist.barrier(group=self.group)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(name)
        return conn

    def _maybe_profiled(self, command: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        profile = command.get("profile", False)
        if self.args.kind == "handler" and self.args.parallel == "pp" and self.rank != 0:
            return None  # pp: the follower loop does this rank's work
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof, self._labelled_pair_link():
                started = time.perf_counter()
                out = self._generate(command)
                wall = time.perf_counter() - started
            out["profile"] = op_summary(prof, wall)
            return out
        return self._generate(command)

    @contextlib.contextmanager
    def _labelled_pair_link(self):
        """tp: the engine's socket all-reduce is no torch op; name it in the profile as communication."""
        pair = None
        if self.args.kind == "handler" and self.args.parallel == "tp":
            import deepspeed.comm.comm as ds_comm

            pair = getattr(getattr(ds_comm.cdb, "inference_all_reduce", None), "ts_plugin_pair", None)
        if pair is None:
            yield
            return
        from torch.profiler import record_function

        exchange = pair.all_reduce

        def all_reduce(tensor):
            with record_function("ts_plugin::all_reduce"):
                return exchange(tensor)

        pair.all_reduce = all_reduce
        try:
            yield
        finally:
            del pair.all_reduce

    def _generate(self, command: Dict[str, Any]) -> Dict[str, Any]:
        prompts, max_new = command["prompts"], command["max_new_tokens"]
        if self.args.kind == "single":
            from ts_plugin.generation import generate
            from ts_plugin.requests import SamplingParams

            ids = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
            started = time.perf_counter()
            results = generate(self.step, self.tokenizer, ids, [SamplingParams(max_new_tokens=max_new)] * len(ids),
                               42, self.eos_ids)
            seconds = time.perf_counter() - started
            texts = [r.text for r in results]
        else:
            if "chunks" in command and self.args.parallel == "pp":
                self.handler.model.chunks = int(command["chunks"])
            rows = [{"body": json.dumps({"inputs": p, "parameters": {"max_new_tokens": max_new}}).encode()}
                    for p in prompts]
            self.context.request_ids = {i: f"bench-{i}" for i in range(len(rows))}
            self.context.statuses = {}
            captured: List[Any] = []
            inference = self.handler.inference

            def capture(requests, on_text=None):
                out = inference(requests, on_text)
                captured.extend(out)
                return out

            self.handler.inference = capture
            try:
                started = time.perf_counter()
                responses = self.handler.handle(rows, self.context)  # what TorchServe's worker calls
                seconds = time.perf_counter() - started
            finally:
                del self.handler.inference
            if self.context.statuses:
                raise RuntimeError(f"handle answered with statuses {self.context.statuses}: {responses}")
            results = captured
            texts = [r["generated_text"] for r in responses]
        return {"seconds": seconds, "texts": texts, "token_ids": [r.token_ids for r in results],
                "ttft_s": [r.time_to_first_token_s for r in results], "gen_s": [r.seconds for r in results]}

    def reference(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Greedy HF `generate`, one prompt at a time: the ground truth every layout must match."""
        torch = self.torch
        out_ids, texts = [], []
        for prompt in command["prompts"]:
            ids = self.tokenizer(prompt, return_tensors="pt")
            with torch.inference_mode():
                out = self.model.generate(**ids, max_new_tokens=command["max_new_tokens"], do_sample=False)
            new = out[0, ids["input_ids"].shape[1]:].tolist()
            for eos in self.eos_ids:
                if eos in new:
                    new = new[:new.index(eos)]
            out_ids.append(new)
            texts.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return {"token_ids": out_ids, "texts": texts}

    def load_time(self) -> Dict[str, Any]:
        """A fresh `from_pretrained` of the same checkpoint in this (already warm) process."""
        from transformers import AutoModelForCausalLM

        gc.collect()
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(self.args.model_dir, dtype=self.torch.float32)
        seconds = time.perf_counter() - started
        del model
        gc.collect()
        return {"seconds": seconds}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.driver")
    parser.add_argument("kind", choices=("single", "handler"))
    parser.add_argument("--parallel", choices=sorted(HANDLERS))
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--config", help="model-config.yaml (handler)")
    parser.add_argument("--jobdir", required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job = Job(args)
    except Exception:
        if int(os.environ.get("RANK", 0)) == 0:
            write_json(Path(args.jobdir) / "ready.json", {"error": traceback.format_exc()})
        raise
    job.serve()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=job.group)
        dist.destroy_process_group()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
