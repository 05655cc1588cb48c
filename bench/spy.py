"""py-spy on a rank while it serves one request: where the main thread's time goes, by kind of frame."""
from __future__ import annotations

import collections
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

#: (substring of a frame, category), first match from the innermost frame outwards wins
CATEGORIES = (
    ("RowParallel", "all-reduce (incl. waiting for the other rank)"),
    ("inference_all_reduce", "all-reduce (incl. waiting for the other rank)"),
    ("broadcast_tokens", "token broadcast"),
    ("scaled_dot_product", "attention"),
    ("sdpa_attention", "attention"),
    ("LinearLayer.forward", "linear layers (matmul)"),
    ("LinearAllreduce.forward", "linear layers (matmul)"),
    ("modules/linear.py", "linear layers (matmul)"),
    ("choose_tokens", "sampling and detokenizing"),
    ("advance (", "sampling and detokenizing"),
)
#: a main-thread sample inside a request has this frame (TorchServe's worker and bench.driver both call it)
REQUEST_FRAME = "LLMHandler.handle"


def py_spy() -> Optional[str]:
    found = Path(sys.executable).parent / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


def categorize(raw: str) -> Dict[str, float]:
    """Share of the samples taken inside a request (LLMHandler.handle on the stack) per category."""
    counts: Dict[str, int] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit() or REQUEST_FRAME not in stack:
            continue  # other threads, or the main thread between requests
        category = "other Python / framework"
        for frame in reversed(stack.split(";")):
            hit = next((cat for key, cat in CATEGORIES if key in frame), None)
            if hit:
                category = hit
                break
        counts[category] += int(count)
    total = sum(counts.values())
    return {cat: n / total for cat, n in counts.most_common()} if total else {}


def profile_request(pid: int, request: Callable[[], None], seconds: float, out: Path) -> Dict[str, float]:
    """Sample `pid` with py-spy (--idle, 100 Hz, non-blocking) while `request()` runs; {} without py-spy."""
    exe = py_spy()
    if exe is None:
        return {}
    duration = max(2, math.ceil(seconds + 2.5))
    proc = subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(duration), "-r", "100", "--idle",
                             "--nonblocking", "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attach
    request()
    try:
        proc.wait(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {}
    try:
        return categorize(out.read_text())
    except OSError:
        return {}
