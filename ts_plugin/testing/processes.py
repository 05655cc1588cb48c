"""Free TCP ports and the end of a process tree, for the TorchServe controller, the tests and the benchmark."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from typing import Iterable, List, Set

import psutil


#: ports free_ports handed out in this process: none twice
_HANDED_OUT: Set[int] = set()


def free_ports(count: int) -> List[int]:
    """`count` distinct TCP ports that are free on 127.0.0.1 right now, below the kernel's ephemeral range and never
    handed out before by this process. A port is often used minutes after it was chosen (a model's rdzv-endpoint at
    archive time, its torchrun at registration); ports from the ephemeral range were then sometimes taken by the
    local end of an outgoing connection (gloo's, a client's), and torchrun met another server there (seen in CI)."""
    below = _ephemeral_low()
    candidates = list(range(max(1024, below - 16384), below))
    random.shuffle(candidates)
    ports: List[int] = []
    for port in candidates:
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        _HANDED_OUT.add(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"fewer than {count} free TCP ports below {below}")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default 32768 where it cannot be read)."""
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def kill_process_tree(process: subprocess.Popen, descendants: Iterable[psutil.Process], grace_s: float = 15) -> None:
    """End `process` (the leader of a session of its own) and `descendants` (listed while it was alive: once it is
    gone, its orphans are nobody's children). Waits `grace_s` for them to leave on their own, then SIGTERM, then
    SIGKILL, to the session and to each descendant."""
    descendants = list(descendants)

    def alive() -> List[psutil.Process]:
        left = []
        for proc in descendants:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
            except psutil.Error:
                pass
        return left

    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for proc in alive():  # torchrun puts its ranks in sessions of their own
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        psutil.wait_procs(alive(), timeout=10)
        if process.poll() is None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
        if not alive():
            break
