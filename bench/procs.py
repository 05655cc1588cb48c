"""Processes the benchmark starts: in-process drivers (bench.driver), TorchServe's workers, memory sampling."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil

from .driver import proc_memory

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
                "PYTHONUNBUFFERED": "1"})
    return env


def kill_tree(root: psutil.Process, known: List[psutil.Process]) -> None:
    """SIGTERM then SIGKILL a process and everything it started (torchrun ranks live in sessions of their own)."""
    try:
        known = known + root.children(recursive=True)
    except psutil.Error:
        pass
    procs = [root] + known
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.send_signal(sig)
                    alive.append(proc)
            except psutil.Error:
                pass
        if not alive:
            return
        psutil.wait_procs(alive, timeout=10)


class Driver:
    """One bench.driver job (a single process, or torchrun with N ranks) answering command files."""

    def __init__(self, name: str, workdir: Path, argv: List[str], nproc: int = 1, threads: int = 1):
        self.name = name
        self.jobdir = Path(workdir) / f"job-{name}"
        self.jobdir.mkdir(parents=True, exist_ok=True)
        for stale in self.jobdir.glob("*.json"):
            stale.unlink()
        self.nproc = nproc
        if nproc > 1:
            cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), "-m", "bench.driver", *argv, "--jobdir", str(self.jobdir)]
        else:
            cmd = [sys.executable, "-m", "bench.driver", *argv, "--jobdir", str(self.jobdir)]
        self.log = open(self.jobdir / "log.txt", "ab")
        self.process = subprocess.Popen(cmd, cwd=REPO, env=base_env(threads), stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._index = 0
        self.info: Dict[str, Any] = {}
        self._procs: List[psutil.Process] = []

    def wait_ready(self, timeout: float = 600) -> Dict[str, Any]:
        path = self.jobdir / "ready.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.process.poll() is not None:
                raise BenchError(f"driver {self.name} exited with {self.process.returncode}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"driver {self.name} not ready in {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.05)
        self.info = json.loads(path.read_text())
        if "error" in self.info:
            raise BenchError(f"driver {self.name} failed to load:\n{self.info['error']}\n{self.tail()}")
        try:
            self._procs = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            self._procs = []
        return self.info

    def call(self, timeout: float = 600, **command) -> Dict[str, Any]:
        self._index += 1
        cmd_path = self.jobdir / f"cmd-{self._index:04d}.json"
        res_path = self.jobdir / f"res-{self._index:04d}.json"
        tmp = cmd_path.with_name(cmd_path.name + ".tmp")
        tmp.write_text(json.dumps(command))
        os.replace(tmp, cmd_path)
        deadline = time.monotonic() + timeout
        while not res_path.exists():
            if self.process.poll() is not None:
                raise BenchError(f"driver {self.name} exited with {self.process.returncode} during "
                                 f"{command['op']}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"driver {self.name}: {command['op']} took over {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.01)  # the driver times its own work; polling here only costs CPU beside it
        result = json.loads(res_path.read_text())
        if not result.get("ok"):
            raise BenchError(f"driver {self.name}: {command['op']} failed: {result.get('error')}\n"
                             f"{result.get('trace', '')}")
        return result

    def tail(self, n: int = 40) -> str:
        try:
            lines = (self.jobdir / "log.txt").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.call(timeout=60, op="stop")
                self.process.wait(timeout=30)
            except (BenchError, subprocess.TimeoutExpired):
                pass
        try:
            kill_tree(psutil.Process(self.process.pid), self._procs)
        except psutil.NoSuchProcess:
            kill_tree_list(self._procs)
        self.log.close()


def kill_tree_list(procs: List[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


# --- TorchServe's workers ---------------------------------------------------------------------------------------

def worker_ranks(frontend_pid: int) -> Dict[int, psutil.Process]:
    """rank -> process of every model worker under a TorchServe frontend (torchrun ranks have RANK set; a
    plain worker is rank 0). The benchmark registers one model at a time, so these are that model's."""
    ranks: Dict[int, psutil.Process] = {}
    try:
        procs = psutil.Process(frontend_pid).children(recursive=True)
    except psutil.Error:
        return ranks
    for proc in procs:
        try:
            cmdline = proc.cmdline()
            if not any(arg.endswith("model_service_worker.py") for arg in cmdline) or any(
                    arg.endswith("torchrun") or arg == "torch.distributed.run" for arg in cmdline):
                continue  # java, torchrun agents (their arguments name the worker script too)
            env = proc.environ()
            ranks[int(env.get("RANK", 0))] = proc
        except psutil.Error:
            continue
    return ranks


def memory_of(procs: Dict[int, psutil.Process]) -> Dict[int, Dict[str, float]]:
    out = {}
    for rank, proc in procs.items():
        try:
            out[rank] = proc_memory(proc.pid)
        except OSError:
            pass
    return out


class RssSampler:
    """Samples VmRSS of some processes every `interval` s in a thread; `peak` is the largest seen per rank."""

    def __init__(self, procs: Dict[int, psutil.Process], interval: float = 0.05):
        self.procs = procs
        self.interval = interval
        self.peak: Dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for rank, memory in memory_of(self.procs).items():
                self.peak[rank] = max(self.peak.get(rank, 0.0), memory["rss_mib"])
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for rank, memory in memory_of(self.procs).items():  # and the peak since start-up, for the record
            self.peak[rank] = max(self.peak.get(rank, 0.0), memory["rss_mib"])


BASELINE_IMPORTS = {
    # what a worker of each parallelType has imported once its handler and engine are loaded
    "tp": ["ts.model_service_worker", "ts_plugin.handlers.tensor_parallel", "ts_plugin.engines.deepspeed",
           "deepspeed", "transformers.models.llama.modeling_llama"],
    "pp": ["ts.model_service_worker", "ts_plugin.handlers.pipeline", "ts_plugin.engines.pipeline", "accelerate",
           "transformers.models.llama.modeling_llama"],
    "pptp": ["ts.model_service_worker", "ts_plugin.handlers.pipeline_tensor_parallel", "ts_plugin.engines.pptp",
             "ts_plugin.engines.pipeline", "accelerate", "torch.distributed.tensor.parallel",
             "transformers.models.llama.modeling_llama"],
    "custom": ["ts.model_service_worker", "ts_plugin.handlers.device_map", "ts_plugin.engines.accelerate",
               "accelerate", "transformers.models.llama.modeling_llama"],
}


def bare_rss(kind: str) -> float:
    """VmRSS (MiB) of a fresh process that imported what a worker of `kind` imports, and nothing else."""
    imports = "; ".join(f"import {name}" for name in BASELINE_IMPORTS[kind])
    code = (f"{imports}; import transformers, gc; transformers.AutoModelForCausalLM; gc.collect(); "
            "from bench.driver import proc_memory; import json; print('RSS', json.dumps(proc_memory()))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=base_env(1), capture_output=True, text=True,
                            timeout=300)
    for line in result.stdout.splitlines():
        if line.startswith("RSS "):
            return json.loads(line[4:])["rss_mib"]
    raise BenchError(f"baseline import for {kind} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


class ForeignCpu:
    """CPU used by processes outside this benchmark during a block (other jobs on a shared machine, plus time
    the hypervisor stole), averaged over the block, in cores: `with ForeignCpu() as load: ...; load.cores`."""

    FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")

    def __init__(self):
        self.cores = float("nan")

    @staticmethod
    def _mine() -> Dict[int, psutil.Process]:
        me = psutil.Process()
        try:
            return {proc.pid: proc for proc in [me] + me.children(recursive=True)}
        except psutil.Error:
            return {me.pid: me}

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        try:
            times = proc.cpu_times()
            return times.user + times.system
        except psutil.Error:
            return 0.0

    def __enter__(self) -> "ForeignCpu":
        self._procs = self._mine()
        self._start_mine = {pid: self._cpu(proc) for pid, proc in self._procs.items()}
        self._start_system = psutil.cpu_times()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        system = psutil.cpu_times()
        wall = time.monotonic() - self._started
        busy = sum(getattr(system, f, 0.0) - getattr(self._start_system, f, 0.0) for f in self.FIELDS)
        mine = sum(max(0.0, self._cpu(proc) - self._start_mine[pid]) for pid, proc in self._procs.items())
        self.cores = max(0.0, busy - mine) / wall if wall > 0 else float("nan")
