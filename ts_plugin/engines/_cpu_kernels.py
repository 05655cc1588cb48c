"""ts_plugin's CPU kernels (`_cpu_kernels.cpp`, float32), built once per machine by torch's cpp_extension for this
CPU's vector width and loaded at first use:

- `paged_decode`: decode rows' attention straight from the paged KV pool (engines/_paged.py);
- `small_linear`: a linear over a decode step's few rows, the lm_head's too. MKL's sgemm reads the weight of a
  3-8 row matmul at about half the memory speed it reaches for one row (on CPUs not Intel's, of every row count up
  to about 32); this kernel streams it once at close to that speed (docs/benchmarks.md, "Decode linears").
  The compiled step calls it as the dispatcher's op `ts_plugin::small_linear`, defined by the kernels;
- `ts_plugin::paged_attention_cpu`: the compiled step's attention on CPU. A step whose rows all decode writes the
  pool and runs paged_decode in C++ (engines/_paged.py's compiled_step gives it the pool's tensors); any other step
  calls back into _paged.py's Python attention.

Without a compiler both fall back to PyTorch's own ops, with a warning.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: the built extension, or None where it could not be built (empty until load_cpu_kernels ran)
KERNELS: List[Any] = []
_VECTOR_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
#: the longest a worker waits for another process's build lock on an extension before it goes on without it
BUILD_LOCK_WAIT_S = 60.0
#: a build lock older than this was left by a killed build (ours and DeepSpeed's op build in under a minute)
STALE_LOCK_S = 600.0
#: linear_plan's: the fewest and the most rows small_linear takes (none until the kernels are loaded), and whether
#: more go to oneDNN's linear instead of aten's (MKL's)
_FEWEST_ROWS, _MOST_ROWS, _ONEDNN_PAST = [1], [0], [False]


def load_cpu_kernels(lock_wait_s: float = BUILD_LOCK_WAIT_S) -> Optional[str]:
    """Build (once per machine: torch caches it) and load the kernels. Returns why not, where they could not be
    built (or another process's build lock stayed past `lock_wait_s`), and says so once in the log: decode rows
    then attend through a gather and the model's own attention (about 1.4x slower a step at 1,024 positions), and
    linears run through PyTorch's."""
    if KERNELS:
        return None if KERNELS[0] is not None else "they failed to build earlier in this process"
    from torch.utils.cpp_extension import load

    # built for this CPU's vector width, under a name of its own: a cache shared by other machines stays valid
    capability = torch.backends.cpu.get_cpu_capability()
    name = f"ts_plugin_cpu_kernels_{capability.lower()}"
    try:
        wait_for_build_lock(name, lock_wait_s)
        with interpreter_tools_first():
            KERNELS.append(load(name=name,
                                sources=[str(Path(__file__).with_name("_cpu_kernels.cpp"))],
                                extra_cflags=["-O3", "-ffast-math", "-fopenmp", *_VECTOR_FLAGS.get(capability, [])],
                                extra_ldflags=["-fopenmp"]))
        plan = linear_plan(KERNELS[0].small_linear_rows_at_once(), cpu_vendor(), torch.backends.mkldnn.is_available())
        (_FEWEST_ROWS[0], _MOST_ROWS[0], _ONEDNN_PAST[0]) = plan
        KERNELS[0].set_linear_plan(*plan)
        torch.library.register_fake("ts_plugin::small_linear", _small_linear_shape)  # the ops the kernels define
        torch.library.register_fake("ts_plugin::paged_attention_cpu", attention_shape)
    except Exception as error:  # noqa: BLE001 - no compiler, or a toolchain torch cannot use: PyTorch's ops serve
        KERNELS.append(None)
        why = f"{type(error).__name__}: {str(error)[:300]}"
        logger.warning("ts_plugin's CPU kernels could not be built (%s): decode rows attend through a gather and "
                       "linears run through PyTorch's", why)
        return why
    return None


def linear_plan(rows_at_once: int, vendor: str, onednn: bool) -> Tuple[int, int, bool]:
    """How `linear` runs a float32 CPU linear of a given row count, by the CPU's vendor: (the fewest and the most
    rows small_linear takes, whether more go to oneDNN's linear rather than aten's). torch's BLAS is MKL, whose fast
    paths serve Intel's CPUs: there its matrix-vector path reads the weight of one or two rows at memory speed and
    its blocked sgemm is as fast past one pass of small_linear, so small_linear takes 3 to `rows_at_once` rows and
    MKL the rest. On other CPUs MKL runs slower paths: on an AMD EPYC (AVX-512, 2 threads, weights past its L3)
    small_linear took 0.16-0.52x MKL's time at 1-12 rows, and oneDNN's linear (on the plain weight, no packed copy)
    0.33-0.64x at 16-128 rows, less than small_linear's from 16 rows on (docs/benchmarks.md, "A host whose MKL is
    slow"). There small_linear takes 1 to 1.5 x `rows_at_once` rows and oneDNN (where torch has it) the rest.

    Example::

        linear_plan(8, "AuthenticAMD", True)  # (1, 12, True)
    """
    if vendor == "GenuineIntel":
        return 3, rows_at_once, False
    return 1, rows_at_once * 3 // 2, onednn


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...); "GenuineIntel" where it cannot be read,
    so that an unknown CPU keeps the measured default."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "GenuineIntel"


@contextlib.contextmanager
def interpreter_tools_first() -> Iterator[None]:
    """Put the interpreter's own bin folder first on PATH while an extension loads, so that every process finds the
    same `ninja` (a venv's, from DeepSpeed's requirements, before a system one). Two ninja versions read each other's
    build log as stale, so a TorchServe worker (whose PATH has the venv) and a script run without it rebuilt the
    extension in turn."""
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def wait_for_build_lock(name: str, wait_s: float) -> None:
    """Raise where extension `name`'s build lock stays past `wait_s`: torch takes it for every load, built or
    not, and waits for it without a bound, so a lock left by a process killed while building would hang every
    worker. A real build usually releases it within the wait; where not, the worker goes on without the
    extension (PyTorch's ops; gloo for DeepSpeed's all-reduce). A lock older than STALE_LOCK_S, far longer than
    any build of these takes, was left by a killed build: it is removed, with a warning."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False), "lock")
    deadline = time.monotonic() + wait_s
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            break
        if age > STALE_LOCK_S:
            logger.warning("removing the build lock %s, %.0f s old: left by a process killed while building", lock,
                           age)
            lock.unlink(missing_ok=True)
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the build lock {lock} stayed for {wait_s:.0f} s (left by a process killed while "
                               "building?); remove it if no build is running")
        time.sleep(0.5)


def built() -> Any:
    """The loaded kernels, or None."""
    return KERNELS[0] if KERNELS else None


def linear(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(hidden, weight, bias)`, through `small_linear` where the call has the rows `linear_plan` gives it
    (a decode step's) of float32 on CPU and the kernels are loaded, and through oneDNN's linear past them where the
    plan says so. `weight` is a plain tensor (not a DTensor).

    Example::

        out = linear(torch.randn(8, 576), torch.randn(1536, 576))  # 8 rows: the weight streamed once
    """
    if torch.compiler.is_compiling() and built() is not None:  # one op of the kernels' in the compiled step's graph
        return torch.ops.ts_plugin.small_linear(hidden, weight, bias)
    rows = hidden.numel() // max(hidden.shape[-1], 1)  # a tp rank may hold none of a layer's columns
    in_plan = _FEWEST_ROWS[0] <= rows <= _MOST_ROWS[0] or (_ONEDNN_PAST[0] and rows > _MOST_ROWS[0])
    if not (in_plan and hidden.dtype == torch.float32 and weight.dtype == torch.float32
            and hidden.device.type == "cpu" and weight.device.type == "cpu" and weight.is_contiguous()
            and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (weight.requires_grad or hidden.requires_grad))):
        return F.linear(hidden, weight, bias)
    flat = hidden.reshape(rows, hidden.shape[-1])
    if rows <= _MOST_ROWS[0]:
        out = KERNELS[0].small_linear(flat, weight, bias)
    else:
        out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), weight, bias, "none", [], "")
    return out.view(*hidden.shape[:-1], weight.shape[0])


def _small_linear_shape(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return hidden.new_empty((*hidden.shape[:-1], weight.shape[0]))


def attention_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float,
                    window: int) -> torch.Tensor:
    """The paged attention ops' output for a `[1, heads, tokens, head dim]` query: `[1, tokens, heads, head dim]`."""
    return query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))


def use_small_batch_linears(model: torch.nn.Module) -> int:
    """Run `model`'s float32 CPU nn.Linear layers through `linear` (small_linear for a decode step's rows, their
    own op otherwise); returns how many layers. Accelerate's hooks stay in front (the layer's `_old_forward` is the
    one replaced where a hook wraps it).

    Example::

        use_small_batch_linears(model)
        model(input_ids=ids)  # [rows, 1] ids: each projection streams its weight once
    """
    if any(parameter.device.type == "cpu" for parameter in model.parameters()):
        load_cpu_kernels()
    if built() is None:
        return 0
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        # a DTensor weight (pptp's tensor parallelism) keeps its own op, which knows its layout
        if (type(module) is torch.nn.Linear and isinstance(weight, torch.nn.Parameter)
                and type(weight.data) is torch.Tensor and weight.device.type == "cpu" and weight.dtype == torch.float32
                and not getattr(module, "_small_batch", False)):
            slot = "_old_forward" if hasattr(module, "_old_forward") else "forward"
            setattr(module, slot, functools.partial(_linear_forward, module))
            module._small_batch = True
            count += 1
    return count


def _linear_forward(module: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return linear(hidden, module.weight, module.bias)
