"""Processes of the benchmark: the in-process drivers (over pipes), TorchServe's worker ranks, memory and the CPU
other jobs use."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import psutil

from ts_plugin.testing import free_ports, kill_process_tree

REPO = Path(__file__).resolve().parents[1]
ANSWER = "@bench "  # the prefix of the driver's answer lines on stdout (the rest is other output)


class BenchError(RuntimeError):
    pass


@contextlib.contextmanager
def baseline_tree(commit: str) -> Iterator[Path]:
    """A git worktree of `commit`, removed afterwards: put it first on PYTHONPATH to run that commit's
    ts_plugin (a change's share, measured against the code before it)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ts_plugin-baseline-") as workdir:
        tree = Path(workdir) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True,
                       capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def base_env(threads: int) -> Dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def proc_memory(pid: Optional[int] = None) -> Dict[str, float]:
    """VmRSS (now) and VmHWM (peak so far) of a process, in MiB, from /proc (Linux)."""
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as status:
        values = {key: int(rest.split()[0]) / 1024 for key, _, rest in (line.partition(":") for line in status)
                  if key in ("VmRSS", "VmHWM")}
    return {"rss_mib": values.get("VmRSS", 0.0), "hwm_mib": values.get("VmHWM", 0.0)}


class Driver:
    """One bench.driver job (one process, or torchrun with `nproc` ranks): a JSON command per line on its stdin,
    the answer as a line on its stdout; its log (stderr) in `workdir/<name>.log`."""

    def __init__(self, name: str, workdir: Path, argv: List[str], nproc: int = 1, threads: int = 1):
        self.name = name
        self.log_path = Path(workdir) / f"{name}.log"
        launcher = [sys.executable, "-m", "bench.driver"]
        if nproc > 1:
            launcher = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(nproc),
                        "--master-addr", "127.0.0.1", "--master-port", str(free_ports(1)[0]), "-m", "bench.driver"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([*launcher, *argv], cwd=REPO, env=base_env(threads), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        self._descendants: List[psutil.Process] = []

    def _answer(self, what: str) -> Dict[str, Any]:
        for line in self.process.stdout:
            if line.startswith(ANSWER):
                answer = json.loads(line[len(ANSWER):])
                if not answer.get("ok"):
                    raise BenchError(f"driver {self.name}: {what} failed: {answer.get('error')}\n{self.tail()}")
                return answer
        raise BenchError(f"driver {self.name} exited ({self.process.wait()}) during {what}\n{self.tail()}")

    def wait_ready(self) -> None:
        self._answer("loading")
        self._descendants = psutil.Process(self.process.pid).children(recursive=True)

    def call(self, **command) -> Dict[str, Any]:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._answer(command["op"])

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(BenchError, OSError, subprocess.TimeoutExpired):
                self.call(op="stop")
                self.process.wait(timeout=30)
        kill_process_tree(self.process, self._descendants, grace_s=0)


def memory_of(procs: Dict[int, psutil.Process]) -> Dict[int, Dict[str, float]]:
    out = {}
    for rank, proc in procs.items():
        with contextlib.suppress(OSError):  # the process is gone
            out[rank] = proc_memory(proc.pid)
    return out


@contextlib.contextmanager
def peak_rss(procs: Dict[int, psutil.Process], interval: float = 0.05) -> Iterator[Dict[int, float]]:
    """`with peak_rss(procs) as peak: ...`: rank -> the largest VmRSS (MiB) seen, sampled every `interval` s in a
    thread while the block runs."""
    peak: Dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while True:
            for rank, memory in memory_of(procs).items():
                peak[rank] = max(peak.get(rank, 0.0), memory["rss_mib"])
            if stop.wait(interval):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


BASELINE_IMPORTS = {  # what a worker of each parallelType has imported once its handler and engine are loaded
    "tp": ["ts_plugin.engines.deepspeed", "deepspeed"],
    "pp": ["ts_plugin.engines.pipeline", "accelerate"],
    "pptp": ["ts_plugin.engines.pptp", "ts_plugin.engines.pipeline", "accelerate", "torch.distributed.tensor.parallel"],
    "custom": ["ts_plugin.engines.accelerate", "accelerate"],
}


def bare_rss(kind: str) -> float:
    """VmRSS (MiB) of a fresh process that imported what a worker of `kind` imports, and nothing else."""
    imports = ["ts.model_service_worker", "ts_plugin.handlers", "transformers.models.llama.modeling_llama",
               *BASELINE_IMPORTS[kind]]
    code = (f"import {', '.join(imports)}, gc; gc.collect(); "
            "from bench.procs import proc_memory; print('RSS', proc_memory()['rss_mib'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=base_env(1), capture_output=True, text=True,
                            timeout=300)
    for line in result.stdout.splitlines():
        if line.startswith("RSS "):
            return float(line[4:])
    raise BenchError(f"baseline import for {kind} failed:\n{result.stderr[-4000:]}")


def _cpu_seconds(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
        return times.user + times.system
    except psutil.Error:
        return 0.0


@contextlib.contextmanager
def foreign_cpu() -> Iterator[List[float]]:
    """`with foreign_cpu() as cores: ...; cores[0]`: CPU used by processes outside this benchmark during the block
    (other jobs on a shared machine, plus time the hypervisor stole), averaged over the block, in cores."""
    me = psutil.Process()
    mine = {proc: _cpu_seconds(proc) for proc in [me, *me.children(recursive=True)]}
    system, started, cores = psutil.cpu_times(), time.monotonic(), []
    yield cores
    wall, now = time.monotonic() - started, psutil.cpu_times()
    busy = sum(getattr(now, f, 0.0) - getattr(system, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq",
                                                                        "steal"))
    used = sum(max(0.0, _cpu_seconds(proc) - start) for proc, start in mine.items())
    cores.append(max(0.0, busy - used) / wall if wall > 0 else float("nan"))
