"""tp on CPU: DeepSpeed's own shared-memory all-reduce, and lean forwards for AutoTP's linear layers.

DeepSpeed ships a single-host CPU all-reduce, the `deepspeed_shm_comm` op (JIT-built once per machine into
torch's extension cache), which its `inference_all_reduce` uses once the op is loaded. The op finds its peers
only when `LOCAL_SIZE` (which DeepSpeed's own launcher sets, and torchrun does not) equals the world size;
otherwise it skips its set-up and its first all-reduce dereferences a null workspace: the SIGSEGV that made
earlier versions of this engine turn it off (DeepSpeed 0.19.8 under torchrun). `use_shared_memory_all_reduce`
gives it `LOCAL_SIZE` from torchrun's `LOCAL_WORLD_SIZE` where every rank is on this host.

What the op and the lean forwards gain: docs/benchmarks.md, "Measurements behind the design".
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist

from ..distributed import Ranks, any_rank_failed
from ._cpu_kernels import BUILD_LOCK_WAIT_S, interpreter_tools_first, linear, wait_for_build_lock
from .base import Progress

_SHM_OP = "deepspeed_shm_comm"


def use_shared_memory_all_reduce(ranks: Ranks, progress: Progress, lock_wait_s: float = BUILD_LOCK_WAIT_S) -> bool:
    """Start DeepSpeed's communication with its shared-memory all-reduce: load it (or compile it, the first
    time on a machine) and let it find the other ranks; returns whether every rank uses it. Where a rank cannot
    (ranks on other hosts, no compiler, an op that does not build, another process's build lock held for more
    than `lock_wait_s`), every rank turns it off and DeepSpeed all-reduces with the process group (gloo). Call it
    before `deepspeed.init_inference`, on every rank."""
    import deepspeed
    import deepspeed.comm

    reason = None
    if os.environ.get("LOCAL_WORLD_SIZE") != str(ranks.world_size):
        reason = "the ranks are not all on this host"
    else:
        reason = _shared_memory_problem(ranks)
    if reason is None:
        os.environ["LOCAL_SIZE"] = str(ranks.world_size)
        started = time.monotonic()
        try:
            load_shared_memory_op(lock_wait_s)
        except Exception as error:  # noqa: BLE001 - a compiler error, a missing header: fall back, loudly
            reason = f"{type(error).__name__}: {error}"
        else:
            progress(f"DeepSpeed's shared-memory all-reduce is loaded ({time.monotonic() - started:.1f} s)")
    if any_rank_failed(reason is not None):
        deepspeed.ops.__compatible_ops__[_SHM_OP] = False
        progress("all-reduces go over gloo: DeepSpeed's shared-memory all-reduce is off "
                 f"({reason or 'another rank cannot use it; its log says why'})")
        return False
    deepspeed.ops.__compatible_ops__[_SHM_OP] = True
    deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    _release_segment_name(ranks.rank)
    return True


#: bytes of one rank's segment: shm.cpp's allreduce_workspace, two 1 MiB and two 32 MiB buffers (+ a few states)
SEGMENT_BYTES = 2 * 2**20 + 2 * 32 * 2**20 + 4096


def _segment_name(rank: int) -> Path:
    """The /dev/shm name DeepSpeed's op gives this rank's segment."""
    return Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _shared_memory_problem(ranks: Ranks) -> Optional[str]:
    """Why DeepSpeed's op must not start here, or None. shm.cpp checks none of this: it writes its 66 MiB segment
    into whatever /dev/shm has (a container's default 64 MiB makes the write short and the first all-reduce
    crash), and it opens an existing name without checking who made it (another user's 0666 segment would carry
    this worker's activations)."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError as error:
        return f"/dev/shm cannot be read ({error})"
    needed, free = ranks.world_size * SEGMENT_BYTES, stats.f_bavail * stats.f_frsize
    if free < needed:
        return (f"/dev/shm has {free / 2**20:.0f} MiB free and the op needs {needed / 2**20:.0f} MiB "
                f"({ranks.world_size} ranks x {SEGMENT_BYTES / 2**20:.0f} MiB); give the container more "
                "(docker --shm-size, a Kubernetes emptyDir with medium: Memory)")
    segment = _segment_name(ranks.rank)
    try:
        owner = segment.stat().st_uid
    except FileNotFoundError:
        return None
    if owner != os.getuid():
        return f"{segment} already exists and belongs to uid {owner}, not this worker's {os.getuid()}"
    segment.unlink()  # this user's, left by a killed worker: the op makes it anew
    return None


def load_shared_memory_op(lock_wait_s: float = BUILD_LOCK_WAIT_S) -> None:
    """Load DeepSpeed's `deepspeed_shm_comm` op, compiling it first where torch's extension cache lacks it;
    raise where it cannot be built here, or another process's build lock stays past `lock_wait_s`. `make venv`
    calls it once, so a first tp worker need not build."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    builder = ShareMemCommBuilder()
    if not builder.is_compatible():
        raise RuntimeError("DeepSpeed says it is not compatible with this host")
    wait_for_build_lock(builder.name, lock_wait_s)
    with interpreter_tools_first():
        builder.load(verbose=False)


def _release_segment_name(rank: int) -> None:
    """Remove this rank's shared-memory segment name once every rank has mapped every segment.

    Each segment (66 MiB in /dev/shm) stays mapped by every rank and is freed when the last of them exits.
    DeepSpeed never removes the names: they outlived the worker, one per rank per rendezvous port, and a
    restarted worker could map a killed one's stale state."""
    dist.barrier()
    _segment_name(rank).unlink(missing_ok=True)


class _LeanForward(functools.partial):
    """A layer's forward set by `use_lean_forwards` (so that `deepspeed_layer_forwards` knows it)."""


def use_lean_forwards(module: torch.nn.Module) -> int:
    """Give DeepSpeed's AutoTP linear layers a plain inference forward; returns how many layers got one.

    DeepSpeed's forwards wrap every call in autograd Functions (ColumnParallel, RowParallel) and deepspeed.comm's
    timed wrappers, and multiply by a transposed view; on a 2-CPU host that Python, paid by each rank for every
    linear layer (seven per Llama decoder layer), cost tp 2 about a seventh of its decode speed. The lean forward
    is the same arithmetic (F.linear without bias is matmul with weight.t(), through small_linear for a decode
    step's rows: engines/_cpu_kernels.py; the bias is added after the all-reduce, as DeepSpeed does) and the same
    all-reduce (DeepSpeed's backend `inference_all_reduce`). Layers of other classes, subclasses, and layers set
    up for gathering, overlap or compiled collectives keep DeepSpeed's forward.
    """
    from deepspeed.comm import ReduceOp
    from deepspeed.comm.comm import cdb as backend
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, LmHeadLinearAllreduce

    def column(layer, input):
        output = linear(input, layer.weight)
        return output if layer.bias is None else output.add_(layer.bias)

    def row(layer, group, input):
        output = linear(input, layer.weight)
        if torch.compiler.is_compiling():  # one opaque op in the compiled step's graph (engines/_compiled.py)
            torch.ops.ts_plugin.inference_all_reduce_(output, group)
        else:
            backend.inference_all_reduce(output, ReduceOp.SUM, layer.mp_group)  # in place
        return output if layer.bias is None else output.add_(layer.bias)

    def head(layer, group, columns, input):  # the head's weight holds this rank's columns: multiply them by its slice
        return row(layer, group, input[..., columns])

    lean = 0
    for layer in module.modules():
        kind = type(layer)
        if (kind not in (LinearLayer, LinearAllreduce, LmHeadLinearAllreduce) or layer.is_training_mode()
                or getattr(layer, "defer_collectives_to_compiler", True)):
            continue
        if kind is LinearLayer:
            if layer.gather_output or LinearLayer.tp_overlap_comm:
                continue
            layer.forward = _LeanForward(column, layer)
        elif kind is LinearAllreduce:
            layer.forward = _LeanForward(row, layer, _group_index(layer.mp_group))
        elif hasattr(layer, "_partition_sizes") and hasattr(layer, "tp_index"):
            sizes = layer._partition_sizes  # frozen when DeepSpeed cut the weight
            start = sum(sizes[:layer.tp_index])
            layer.forward = _LeanForward(head, layer, _group_index(layer.mp_group),
                                         slice(start, start + sizes[layer.tp_index]))
        else:
            continue
        lean += 1
    return lean


#: the process groups of the lean forwards' all-reduces, by the index `ts_plugin::inference_all_reduce_` takes
_GROUPS: List[Any] = []


def _group_index(group: Any) -> int:
    for index, known in enumerate(_GROUPS):
        if known is group:
            return index
    _GROUPS.append(group)
    return len(_GROUPS) - 1


@torch.library.custom_op("ts_plugin::inference_all_reduce_", mutates_args=("tensor",))
def _all_reduce_op(tensor: torch.Tensor, group: int) -> None:
    from deepspeed.comm import ReduceOp
    from deepspeed.comm.comm import cdb

    cdb.inference_all_reduce(tensor, ReduceOp.SUM, _GROUPS[group])


@_all_reduce_op.register_fake
def _(tensor, group):
    return None


@contextlib.contextmanager
def deepspeed_layer_forwards(module: torch.nn.Module) -> Iterator[int]:
    """Within the block, `module`'s layers run DeepSpeed's own forwards instead of the lean ones (for comparing
    the two); yields how many layers were switched.

    Example::

        with deepspeed_layer_forwards(step_model.model):
            logits_as_shipped = step_model.model(input_ids=ids).logits
    """
    lean = {layer: layer.__dict__.pop("forward") for layer in module.modules()
            if isinstance(layer.__dict__.get("forward"), _LeanForward)}
    try:
        yield len(lean)
    finally:
        for layer, forward in lean.items():
            layer.forward = forward
