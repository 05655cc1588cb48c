"""Free TCP ports and the end of a process tree, for the TorchServe controller, the tests and the benchmark."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Iterable, List

import psutil


def free_ports(count: int) -> List[int]:
    """`count` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = []
    try:
        # all bound at once: the kernel cannot hand the same port out twice
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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
