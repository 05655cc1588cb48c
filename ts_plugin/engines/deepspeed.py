"""parallelType tp: DeepSpeed inference (AutoTP by default) over the worker's ranks."""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import select
import struct
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig, ParallelLayout
from ..distributed import any_rank_failed, broadcast_tokens
from ._checkpoint import (build_meta_model, checkpoint_index, checkpoint_key, checkpoint_names, load_causal_lm,
                          peak_rss_mb, read_tensors, release_memory, tied_names)
from .base import EngineError, HFStepModel, LoadContext, Progress


def inference_config(config: ModelConfig, layout: ParallelLayout, model_dir: Path, device: torch.device,
                     dtype: torch.dtype) -> Dict[str, Any]:
    """DeepSpeed init_inference settings: the JSON file (as the validator read it), then the inline `deepspeed` keys
    on top."""
    section = config.deepspeed
    settings: Dict[str, Any] = {}
    if section is not None:
        settings.update(section.file_settings)
        inline = section.model_dump(exclude_none=True, exclude={"config", "checkpoint"}, exclude_unset=True)
        settings.update(inline)
    settings.pop("mp_size", None)  # deprecated spelling, validated equal to tp_size
    settings["tensor_parallel"] = {**settings.get("tensor_parallel", {}), "tp_size": layout.tp_size}
    settings["dtype"] = dtype
    kernel_inject = bool(settings.get("replace_with_kernel_inject", False))
    if kernel_inject and device.type != "cuda":
        raise EngineError("deepspeed.replace_with_kernel_inject needs a GPU; this worker runs on CPU. "
                          "Remove it (AutoTP works on CPU) or serve on a GPU host with deviceType gpu.")
    settings["replace_with_kernel_inject"] = kernel_inject
    if section is not None and section.checkpoint:
        if not kernel_inject:
            raise EngineError("deepspeed.checkpoint (DeepSpeed's meta-tensor loading) works only with "
                              "replace_with_kernel_inject on GPU; remove it to load the HF folder with AutoTP.")
        settings["checkpoint"] = str(model_dir / section.checkpoint)
    return settings


def _injection_policy(model: torch.nn.Module, policy: Dict[str, Any]) -> Dict[type, tuple]:
    """YAML gives class names; DeepSpeed wants the classes."""
    classes = {type(module).__name__: type(module) for module in model.modules()}
    resolved = {}
    for name, layers in policy.items():
        if name not in classes:
            raise EngineError(f"deepspeed.injection_policy names {name!r}, which is not a module class of "
                              f"{type(model).__name__}; classes: {', '.join(sorted(classes)[:12])}...")
        resolved[classes[name]] = tuple(layers if isinstance(layers, (list, tuple)) else [layers])
    return resolved


def load(context: LoadContext) -> HFStepModel:
    """Shard the model with DeepSpeed on every rank; returns this rank's step model. Each rank reads only its own
    slices of the checkpoint where `_load_slices` can, else the whole model (`_load_whole`)."""
    import deepspeed

    config, layout, ranks, device, dtype = context.config, context.layout, context.ranks, context.device, context.dtype
    progress = context.progress
    settings = inference_config(config, layout, context.model_dir, device, dtype)
    if device.type == "cpu":
        # DeepSpeed's JIT shared-memory allreduce crashes on CPU hosts (see README); gloo's is used instead.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    module = _load_slices(config, layout, settings, context.model_path, device, dtype, progress)
    if module is None:
        module = _load_whole(config, layout, settings, context.model_path, device, dtype, progress)
    share = broadcast_tokens if ranks.world_size > 1 else None
    if device.type == "cpu" and ranks.world_size == 2:
        pair = _use_pair_all_reduce(layout.process_group_timeout_s, progress)
        if pair is not None:
            progress(f"{_use_lean_forwards(module, pair)} tensor-parallel linear layers run the lean CPU forward")
            share = pair.broadcast
    _check_it_runs(module, device)
    release_memory()
    progress(f"shard ready (peak RSS {peak_rss_mb():.0f} MiB)")
    return HFStepModel(module, device, share=share, samples_here=ranks.is_driver)


def _check_it_runs(module: torch.nn.Module, device: torch.device) -> None:
    """One forward of one token on every rank before READY: AutoTP shards some models in a way their own code
    cannot run (transformers' Phi-3 slices its fused qkv_proj output by the whole model's head counts), and such a
    worker would otherwise fail every request. The shapes are the same on every rank, so every rank fails alike."""
    try:
        with torch.inference_mode():
            module(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    except RuntimeError as error:
        raise EngineError(f"DeepSpeed sharded {type(module).__name__} over the ranks, but the sharded model cannot run "
                          f"({error}). Serve it with parallelType pp or custom, or give deepspeed.injection_policy / "
                          "kernel injection on a GPU host.") from error


def _init_inference(model: torch.nn.Module, settings: Dict[str, Any]):
    import deepspeed

    if "injection_policy" in settings:
        settings = {**settings, "injection_policy": _injection_policy(model, settings["injection_policy"])}
    try:
        return deepspeed.init_inference(model, config=settings)
    except Exception as error:  # noqa: BLE001 - DeepSpeed raises bare Exceptions/AssertionErrors
        if "AutoTP not supported" in str(error) or "kernel injection" in str(error):
            raise EngineError(
                f"DeepSpeed AutoTP cannot shard {type(model).__name__}: {error}. Give deepspeed.injection_policy "
                "(module class -> names of the layers whose output is all-reduced), or use kernel injection on a "
                "GPU host (replace_with_kernel_inject: true), or serve this model with parallelType pp.") from error
        raise


def _load_whole(config: ModelConfig, layout: ParallelLayout, settings: Dict[str, Any], model_path: Path,
                device: torch.device, dtype: torch.dtype, progress: Progress) -> torch.nn.Module:
    """from_pretrained of the whole checkpoint on every rank, then DeepSpeed shards it."""
    progress(f"reading checkpoint {model_path} (peak RSS {peak_rss_mb():.0f} MiB)")
    model = load_causal_lm(model_path, dtype, config.handler.trust_remote_code)
    progress(f"sharding {type(model).__name__} with DeepSpeed tp_size={layout.tp_size} "
             f"({'kernel injection' if settings['replace_with_kernel_inject'] else 'AutoTP'})")
    module = _init_inference(model, settings).module.to(device)
    del model
    if device.type == "cpu":
        _own_memory(module)
    return module


class _NotSliced(Exception):
    """This model or config cannot be read slice by slice; the message says why."""


def _load_slices(config: ModelConfig, layout: ParallelLayout, settings: Dict[str, Any], model_path: Path,
                 device: torch.device, dtype: torch.dtype, progress: Progress) -> Optional[torch.nn.Module]:
    """AutoTP on a meta-device skeleton, then each parameter filled with only this rank's slice of it, read from
    the safetensors files: a rank holds about its share of the model at any time. Returns None, on every rank
    alike, where that cannot be done (the caller then loads the whole model)."""
    reason: Optional[str] = None
    try:
        if settings["replace_with_kernel_inject"] or settings.get("checkpoint"):
            raise _NotSliced("DeepSpeed's kernel injection or its own checkpoint loading is configured")
        model, keys, index = _skeleton(model_path, dtype, config.handler.trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any surprise falls back to the whole-model path
        reason = _why(error)
    if not _every_rank_can(reason, progress):  # before DeepSpeed's collectives
        return None
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    before = peak_rss_mb()
    progress(f"sharding {type(model).__name__} with DeepSpeed tp_size={layout.tp_size} (AutoTP) on the meta "
             f"device, then reading this rank's slices of {model_path} (peak RSS {before:.0f} MiB)")
    try:
        buffers = dict(model.named_buffers(remove_duplicate=False))  # init_inference's to_empty wipes them
        engine = _init_inference(model, settings)
        del model
        rank = dist.get_rank(group=engine.mp_group) if engine.mp_group is not None else 0
        held = _fill_from_checkpoint(engine.module, rank, keys, buffers, index, device)
        module = engine.module
    except EngineError:  # AutoTP cannot shard this model at all: the whole model would fail alike
        raise
    except Exception as error:  # noqa: BLE001 - see above
        reason = _why(error)
    if not _every_rank_can(reason, progress):
        return None
    progress(f"read {held / 2**20:.1f} MiB of the model's {total / 2**20:.1f} MiB (model / tp_size = "
             f"{total / layout.tp_size / 2**20:.1f} MiB); peak RSS {peak_rss_mb():.0f} MiB, "
             f"{peak_rss_mb() - before:+.0f} MiB over the {before:.0f} MiB before")
    return module


def _why(error: Exception) -> str:
    return str(error) if isinstance(error, _NotSliced) else f"{type(error).__name__}: {error}"


def _every_rank_can(reason: Optional[str], progress: Progress) -> bool:
    if any_rank_failed(reason is not None):
        progress(f"loading the whole model on every rank: "
                 f"{reason or 'another rank cannot read its slices (its log says why)'}")
        return False
    return True


def _skeleton(model_path: Path, dtype: torch.dtype, trust_remote_code: bool):
    """The model on the meta device, and the checkpoint tensor behind each parameter and persistent buffer."""
    index = checkpoint_index(model_path)
    if any(file.suffix != ".safetensors" for file in index.values()):
        raise _NotSliced("the checkpoint is not safetensors (.bin files are read whole)")
    model = build_meta_model(model_path, dtype, trust_remote_code)
    names, converted = checkpoint_names(model, index)
    if converted:
        raise _NotSliced(f"transformers converts {', '.join(sorted(converted)[:3])} ... from another layout "
                         "when it loads the whole model")
    tied = tied_names(model)
    keys: Dict[str, str] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        key = checkpoint_key(name, names, tied)
        if key is None:
            raise _NotSliced(f"{name} is not in the checkpoint (from_pretrained initializes it)")
        keys[name] = key
    for module_name, module in model.named_modules():
        for attr in module._buffers:
            name = f"{module_name}.{attr}" if module_name else attr
            if attr not in module._non_persistent_buffers_set and name in names:
                keys[name] = names[name]
    return model, keys, index


def _fill_from_checkpoint(module: torch.nn.Module, rank: int, keys: Dict[str, str],
                          buffers: Dict[str, torch.Tensor], index: Dict[str, Path], device: torch.device) -> int:
    """Give every parameter and buffer of the sharded skeleton its data: parameters (and the persistent buffers
    the checkpoint has) this rank's block of their checkpoint tensor, other buffers their value from before
    DeepSpeed. Each tensor object is filled once, in every place it is registered; returns the bytes read."""
    import re

    from deepspeed.checkpoint.constants import AFFINE_MAP, AFFINE_MAP_PARAMS
    from deepspeed.module_inject.layers import (LinearAllreduce, LinearLayer, LmHeadLinearAllreduce,
                                                TensorParallel_Layer, collect_autotp_universal_checkpoint_info)

    # DeepSpeed's own description of which part of the full tensor each rank holds (universal checkpoint)
    layouts = collect_autotp_universal_checkpoint_info(module).get(AFFINE_MAP, {}).get(AFFINE_MAP_PARAMS, {})
    places: Dict[int, list] = {}  # tensor id -> [(module, attr, is parameter)] where it is registered
    reads: Dict[str, tuple] = {}  # name -> (tensor id, full shape, index of the block)
    restores = []  # (tensor id, name) of buffers that keep their value from before DeepSpeed
    for module_name, child in module.named_modules(remove_duplicate=False):
        sharded = isinstance(child, TensorParallel_Layer)
        if sharded and type(child) not in (LinearLayer, LinearAllreduce, LmHeadLinearAllreduce):
            raise _NotSliced(f"AutoTP made {module_name} a {type(child).__name__} (fused or reshaped weights), "
                             "which is not read slice by slice")
        for attr, tensor, is_param in itertools.chain(((a, t, True) for a, t in child._parameters.items()),
                                                      ((a, t, False) for a, t in child._buffers.items())):
            if tensor is None:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            if id(tensor) not in places:
                places[id(tensor)] = []
                if name in keys:
                    full, block = _rank_block(layouts.get(f"^{re.escape(name)}$"), rank, tuple(tensor.shape), name,
                                              sharded)
                    reads[name] = (id(tensor), full, block)
                elif not is_param and name in buffers:
                    restores.append((id(tensor), name))
                else:
                    raise _NotSliced(f"DeepSpeed added {name}, which the checkpoint does not have")
            places[id(tensor)].append((child, attr, is_param))

    def fill(tensor_id: int, value: torch.Tensor) -> int:
        child, attr, is_param = places[tensor_id][0]
        current = (child._parameters if is_param else child._buffers)[attr]
        value = value.to(device=device, dtype=current.dtype if value.is_floating_point() else value.dtype)
        if is_param:
            value = torch.nn.Parameter(value, requires_grad=False)
        for child, attr, is_param in places[tensor_id]:
            (child._parameters if is_param else child._buffers)[attr] = value
        return value.numel() * value.element_size()

    for tensor_id, name in restores:
        fill(tensor_id, buffers[name])
    held = 0

    def block_of(name: str, stored: tuple):
        _, full, block = reads[name]
        if stored != full:
            raise _NotSliced(f"{keys[name]} is {stored} in the checkpoint but {full} in the model")
        return block

    for name, value in read_tensors({name: keys[name] for name in reads}, index, block_of):
        tensor_id = reads[name][0]
        child, attr, _ = places[tensor_id][0]
        expected = tuple(getattr(child, attr).shape)
        if tuple(value.shape) != expected:
            raise _NotSliced(f"{name} is {expected} on rank {rank} but its slice is {tuple(value.shape)}")
        held += fill(tensor_id, value)
    return held


def _rank_block(layout: Optional[Dict[str, Any]], rank: int, shape: tuple, name: str, sharded: bool):
    """(full shape, index) of the block of its checkpoint tensor that this rank's `shape`-d tensor holds, from
    DeepSpeed's affine map (index None: the whole tensor). Only one dense block of exactly `shape` is accepted:
    that fills the tensor exactly once."""
    if layout is None:
        if sharded:
            raise _NotSliced(f"DeepSpeed does not say how {name} is split")
        return shape, None
    from deepspeed.checkpoint.affine import ParamAffineMap

    layout = ParamAffineMap.from_dict(layout)
    full, pieces = layout.logical_shape, layout.pieces_by_rank.get(rank, [])

    def strides(dims: tuple) -> tuple:
        return tuple(math.prod(dims[i + 1:]) for i in range(len(dims)))

    piece = pieces[0] if len(pieces) == 1 else None
    if (piece is None or piece.shape != shape or piece.scale != 1.0 or piece.dest_offset != 0
            or piece.dest_strides != strides(shape) or piece.source_strides != strides(full)):
        raise _NotSliced(f"rank {rank}'s part of {name} {shape} is not one block of it: {pieces}")
    start, rest = [], piece.source_offset
    for stride in strides(full):
        start.append(rest // stride)
        rest %= stride
    if not math.prod(shape):  # an empty share (DeepSpeed gives a rank none of a small dimension)
        start = [0] * len(shape)
    if any(first + size > dim for first, size, dim in zip(start, shape, full)):
        raise _NotSliced(f"rank {rank}'s block of {name} lies outside its {full} tensor: {piece}")
    return full, None if shape == full else tuple(slice(first, first + size) for first, size in zip(start, shape))


def _own_memory(module: torch.nn.Module) -> None:
    """Give every parameter and buffer memory of its own.

    transformers memory-maps safetensors checkpoints, and AutoTP copies out the slices it shards but leaves other
    tensors (embeddings, norms, ...) as they were loaded: still views of the file mapping. Each keeps its whole
    file mapped, with every page AutoTP read while slicing resident, so each rank went on holding about the whole
    checkpoint in RSS (measured: 542 MiB of mapped .safetensors pages beside a 390 MiB shard). Copying tensor by
    tensor (at most one extra tensor at a time) drops the last references to the mappings.
    """
    with torch.no_grad():
        for parameter in module.parameters():  # tied parameters are one object: they stay tied
            parameter.data = parameter.data.clone()
        for child in module.modules():
            for name, buffer in child._buffers.items():
                if buffer is not None:
                    child._buffers[name] = buffer.clone()


_NOTHING = memoryview(b"")


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


# A rank asleep in poll() woke ~0.1 ms after the other's bytes came (2-vCPU VM), at times only after milliseconds (as
# if woken on the other rank's busy CPU); a decode step waits 37 times. Like an OpenMP thread, spin before sleeping.
_SPIN_S = 0.002


def _spin_seconds() -> float:
    """How long a rank busy-waits for the other rank's bytes before it sleeps in poll(): 0 under OpenMP's
    OMP_WAIT_POLICY=PASSIVE, or where the ranks have fewer CPUs than ranks (a spinning rank would take the other's).
    """
    if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        return 0.0
    return _SPIN_S if len(os.sched_getaffinity(0)) >= dist.get_world_size() else 0.0


class _RankPair:
    """A Unix stream socket between the two ranks of a worker on one host, to all-reduce over.

    Rank 0 listens on an abstract socket name the kernel picks (autobind), sends the name to rank 1 over the
    process group, and accepts only the connection whose SO_PEERCRED pid is rank 1's. The socket is non-blocking:
    each exchange sends and receives at once, busy-waits up to `spin_s` when neither moves, then sleeps in poll().
    It times out after `timeout_s` (the process group's timeout); a peer that exits closes the socket, and the
    waiting rank fails at once.
    """

    def __init__(self, timeout_s: float, spin_s: float):
        import socket

        self.first = dist.get_rank() == 0
        pids: list = [None, None]
        dist.all_gather_object(pids, os.getpid())
        server = None
        name: list = [None]
        if self.first:
            try:
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.bind("")  # Linux autobind: a unique abstract name, nothing on the file system
                server.listen(1)
                name[0] = server.getsockname()
            except OSError as error:
                name[0] = error  # rank 1 must still get its answer
        dist.broadcast_object_list(name, src=0)
        try:
            if isinstance(name[0], OSError):
                raise name[0]
            if self.first:
                server.settimeout(timeout_s)
                while True:
                    conn, _ = server.accept()
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    if struct.unpack("3i", creds)[0] == pids[1]:
                        break
                    conn.close()  # not the other rank
            else:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.settimeout(timeout_s)
                conn.connect(name[0])
        finally:
            if server is not None:
                server.close()
        conn.setblocking(False)  # _exchange sends and receives at once, and waits in poll()
        self.conn = conn
        self.timeout_s = timeout_s
        self.spin_s = spin_s
        self.broken: Optional[str] = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` (CPU, contiguous) with the other rank's, in place; a + b is the same IEEE sum on both
        ranks."""
        other = torch.empty_like(tensor)
        self._exchange("all-reduce with", _bytes(tensor), _bytes(other))
        return tensor.add_(other)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` (CPU, the same shape and dtype on both ranks) on both ranks."""
        tensor = tensor.contiguous()
        view = _bytes(tensor)
        self._exchange("broadcast to", view if self.first else _NOTHING, _NOTHING if self.first else view)
        return tensor

    def _exchange(self, what: str, send: memoryview, receive: memoryview) -> None:
        """Send and receive at the same time (non-blocking), so no size can leave both ranks stuck in a send."""
        if self.broken:
            raise RuntimeError(f"the tensor-parallel link between the ranks failed earlier ({self.broken}); "
                               "this worker must be restarted")
        sent = got = 0
        idle_since = None
        try:
            while sent < len(send) or got < len(receive):
                moved = False
                if sent < len(send):
                    try:
                        sent += self.conn.send(send[sent:])
                        moved = True
                    except BlockingIOError:
                        pass
                if got < len(receive):
                    try:
                        count = self.conn.recv_into(receive[got:])
                    except BlockingIOError:
                        count = None
                    if count == 0:
                        raise ConnectionResetError("the other tensor-parallel rank closed the connection")
                    if count:
                        got += count
                        moved = True
                if moved:
                    idle_since = None
                    continue
                now = time.monotonic()
                idle_since = idle_since or now
                if now - idle_since >= self.spin_s:
                    self._wait(readable=got < len(receive), writable=sent < len(send))
        except OSError as error:  # timeout, or the other rank is gone: the stream is out of step from here on
            self.broken = f"{type(error).__name__}: {error}"
            raise RuntimeError(f"{what} the other tensor-parallel rank failed: {self.broken}") from error

    def _wait(self, readable: bool, writable: bool) -> None:
        events = (select.POLLIN if readable else 0) | (select.POLLOUT if writable else 0)
        poller = select.poll()
        poller.register(self.conn, events)
        if not poller.poll(self.timeout_s * 1000):
            raise TimeoutError(f"nothing from the other rank in {self.timeout_s:g} s")


def _use_pair_all_reduce(timeout_s: float, progress: Progress) -> Optional[_RankPair]:
    """On CPU with 2 ranks, all-reduce through a socket between the ranks instead of gloo's allreduce; returns the
    socket link (None where the ranks fall back to gloo send/recv).

    AutoTP all-reduces twice per decoder layer and once for the LM head, on a few KiB per decode step. On a
    2-core host one gloo allreduce of 4 KiB took ~0.8 ms (a gloo isend/irecv exchange ~0.5 ms: each message is
    handed between gloo's threads), the same bytes through a Unix socket ~0.04 ms; the all-reduces were about
    half of a tp 2 decode step. Other reductions, groups and devices keep DeepSpeed's path; if the socket cannot be
    set up, the ranks exchange with gloo's isend/irecv.
    """
    import deepspeed.comm.comm as ds_comm

    backend = getattr(ds_comm, "cdb", None)
    original = getattr(backend, "inference_all_reduce", None)
    if original is None:
        return None
    if hasattr(original, "ts_plugin_pair"):  # a model loaded before in this process set it up
        return original.ts_plugin_pair
    pair: Optional[_RankPair] = None
    try:
        pair = _RankPair(timeout_s, _spin_seconds())
    except OSError as error:  # no AF_UNIX, a timeout, a refused connection
        progress(f"all-reduce over a Unix socket unavailable ({error}); using gloo send/recv")
    if any_rank_failed(pair is None) and pair is not None:  # both ranks take the same path
        pair.conn.close()
        pair = None

    def inference_all_reduce(tensor, op=ds_comm.ReduceOp.SUM, group=None):
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        if (ranks != [0, 1] or tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dim() == 0
                or backend._reduce_op(op) != dist.ReduceOp.SUM):
            return original(tensor, op, group)
        if pair is not None:
            return pair.all_reduce(tensor)
        other = torch.empty_like(tensor)
        peer = 1 - dist.get_rank()
        for work in (dist.isend(tensor, peer, group=group), dist.irecv(other, peer, group=group)):
            work.wait()
        return tensor.add_(other)

    inference_all_reduce.__wrapped__ = original
    inference_all_reduce.ts_plugin_pair = pair
    backend.inference_all_reduce = inference_all_reduce
    return pair


class _LeanForward(functools.partial):
    """A layer's forward set by `_use_lean_forwards` (so that `deepspeed_layer_forwards` knows it)."""


def _use_lean_forwards(module: torch.nn.Module, pair: _RankPair) -> int:
    """Give DeepSpeed's AutoTP linear layers a plain inference forward that all-reduces over `pair`; returns how
    many layers got one.

    DeepSpeed's forwards wrap every call in autograd Functions (ColumnParallel, RowParallel) and deepspeed.comm's
    timed wrappers, and multiply by a transposed view; on a 2-core host that Python cost, paid by each rank for
    every linear layer (seven per Llama decoder layer), made a rank's Python and small ops about 1.7x those of one
    process running the whole model (tp 2 decode 0.79x of it, 0.85-0.93x with the lean forward). The lean forward is
    the same arithmetic (F.linear without bias is matmul with weight.t(); the bias is added after the all-reduce,
    as DeepSpeed does).
    Layers of other classes, subclasses, and layers set up for gathering, overlap or compiled collectives keep
    DeepSpeed's forward.
    """
    import torch.nn.functional as F
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, LmHeadLinearAllreduce

    def column(layer, input):
        output = F.linear(input, layer.weight)
        return output if layer.bias is None else output.add_(layer.bias)

    def row(layer, input):
        output = pair.all_reduce(F.linear(input, layer.weight))
        return output if layer.bias is None else output.add_(layer.bias)

    def head(layer, columns, input):  # the head's weight holds this rank's columns: multiply them by its slice
        return row(layer, input[..., columns])

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
            layer.forward = _LeanForward(row, layer)
        elif hasattr(layer, "_partition_sizes") and hasattr(layer, "tp_index"):
            sizes = layer._partition_sizes  # frozen when DeepSpeed cut the weight
            start = sum(sizes[:layer.tp_index])
            layer.forward = _LeanForward(head, layer, slice(start, start + sizes[layer.tp_index]))
        else:
            continue
        lean += 1
    return lean


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
