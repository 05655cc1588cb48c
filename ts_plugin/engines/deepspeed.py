"""parallelType tp: DeepSpeed inference (AutoTP by default) over the worker's ranks."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig, ParallelLayout
from ..distributed import any_rank_failed, broadcast_tokens
from ._checkpoint import (build_meta_model, checkpoint_index, checkpoint_key, checkpoint_names, load_causal_lm,
                          peak_rss_mb, read_tensors, release_memory, tied_names)
from ._cpu_tp import BUILD_LOCK_WAIT_S, use_lean_forwards, use_shared_memory_all_reduce
from .base import EngineError, HFStepModel, LoadContext, Progress


def inference_config(config: ModelConfig, layout: ParallelLayout, file_settings: Dict[str, Any], model_dir: Path,
                     device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """DeepSpeed init_inference settings: `file_settings` (the JSON file as the validator read it: its report's
    deepspeed_file), then the inline `deepspeed` keys on top."""
    section = config.deepspeed
    settings: Dict[str, Any] = {}
    if section is not None:
        settings.update(file_settings)
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
    config, layout, ranks, device, dtype = context.config, context.layout, context.ranks, context.device, context.dtype
    progress = context.progress
    settings = inference_config(config, layout, context.deepspeed_file, context.model_dir, device, dtype)
    if device.type == "cpu" and ranks.world_size > 1:
        # a tp LOAD that outlasts startupTimeout desynchronises TorchServe 0.12 (README, Limitations): the wait
        # for another process's build of the op takes at most a quarter of it
        use_shared_memory_all_reduce(ranks, progress, min(BUILD_LOCK_WAIT_S, config.startup_timeout / 4))
    module = _load_slices(config, layout, settings, context.model_path, device, dtype, progress)
    if module is None:
        module = _load_whole(config, layout, settings, context.model_path, device, dtype, progress)
    if device.type == "cpu":
        progress(f"{use_lean_forwards(module)} tensor-parallel linear layers run the lean CPU forward")
    _check_it_runs(module, device)
    release_memory()
    progress(f"shard ready (peak RSS {peak_rss_mb():.0f} MiB)")
    share = broadcast_tokens if ranks.world_size > 1 else None
    return HFStepModel(module, device, share=share, samples_here=ranks.rank == 0,
                       compile_step=config.handler.compile_step, progress=progress)


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
    checkpoint in RSS (docs/benchmarks.md, "Measurements behind the design"). Copying tensor by
    tensor (at most one extra tensor at a time) drops the last references to the mappings.
    """
    with torch.no_grad():
        for parameter in module.parameters():  # tied parameters are one object: they stay tied
            parameter.data = parameter.data.clone()
        for child in module.modules():
            for name, buffer in child._buffers.items():
                if buffer is not None:
                    child._buffers[name] = buffer.clone()
