"""parallelType custom: one process fills the worker's devices with HuggingFace Accelerate big-model inference.

The model is built from its HF config with parameters on the meta device (`_checkpoint.build_meta_model`,
buffers real), the device map is computed with Accelerate's own `get_balanced_memory` /
`infer_auto_device_map` (or taken as given when the config names a module -> device dict), and the
checkpoint is loaded into that map by transformers' own `from_pretrained(device_map=..., offload_folder=...)`,
which applies the model's checkpoint key mapping (GPT-NeoX's `embed_out` is its `lm_head`) and ties weights;
a weight the checkpoint lacks is refused rather than initialised at random. Host memory at the peak holds
about the parameters placed on the CPU, never a second copy of the model (docs/benchmarks.md, "Measurements
behind the design").

Modules that do not fit go to "disk": transformers reads safetensors weights for them in place, from the
checkpoint, and writes memory-mapped files only where it must (a dtype change, .bin checkpoints), into an
offload folder: `handler.offload_folder` (resolved inside the model folder, never outside) or a temporary
folder. Either way each load writes into a sub-folder of its own (named after the process id), removed when
the process exits or, after a SIGKILL, by the next load; so two workers of one model never share files.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..config.schema import DEVICE_MAP_STRATEGIES as STRATEGIES
from ..config.schema import HandlerConfig, parse_device
from ._checkpoint import build_meta_model, load_causal_lm, peak_rss_mb, release_memory
from ._onednn_head import use_onednn_head
from .base import EngineError, HFStepModel, LoadContext, Progress


Device = Union[int, str]
DeviceMap = Dict[str, Device]

_WORKER_PREFIX = "worker-{pid}-"
_TEMP_PREFIX = "ts_plugin-offload-{pid}-"


class DispatchedModel(HFStepModel):
    """A step model whose modules Accelerate placed by `device_map` (GPU ids, "cpu", "disk")."""

    def __init__(self, model: torch.nn.Module, device: torch.device, device_map: DeviceMap,
                 offload_dir: Optional[Path], **step_options: Any):
        super().__init__(model, device, **step_options)
        self.device_map = device_map
        self.offload_dir = offload_dir
        self._cleanup = (weakref.finalize(self, shutil.rmtree, str(offload_dir), True)
                         if offload_dir is not None else None)

    def close(self) -> None:
        """Remove this process's offloaded weights (also done when the process exits)."""
        if self._cleanup is not None:
            self._cleanup()


# --- configuration -------------------------------------------------------------------------------

def device_value(value: Any, where: str) -> Device:
    """A device-map or max_memory device (`config.schema.parse_device`, as rule TSP503 reads it), or EngineError."""
    device = parse_device(value)
    if device is None:
        raise EngineError(f"{where}: {value!r} is not a device (use a GPU id such as 0, cpu or disk)")
    return device


def max_memory_for(configured: Optional[Dict[Any, Any]], gpus: int, progress: Progress) -> Optional[Dict[Device, int]]:
    """handler.max_memory with normalized keys and sizes in bytes, limited to the devices this worker uses.

    Unset: every visible GPU and the available host memory (Accelerate's default), or only the host when
    the worker runs on CPU. As in Accelerate, a device missing from a given dict is not used (layers that
    fit nowhere else go to disk).
    """
    from accelerate.utils import convert_file_size_to_int

    if configured is None:
        if gpus:
            return None  # Accelerate measures the free memory of every GPU and of the host
        return {"cpu": _available_host_memory()}
    result: Dict[Device, int] = {}
    dropped = []
    for key, size in configured.items():
        device = device_value(key, f"handler.max_memory key {key!r}")
        if isinstance(device, int) and device >= gpus:
            if not gpus:
                dropped.append(device)
                continue
            raise EngineError(f"handler.max_memory names GPU {device}, but this worker sees {gpus} GPU(s) "
                              f"(ids 0..{gpus - 1}; with parallelLevel the ids count within the worker's GPUs)")
        try:
            result[device] = size if isinstance(size, int) else convert_file_size_to_int(size)
        except ValueError as error:
            raise EngineError(f"handler.max_memory[{key!r}] = {size!r} is not a size such as 10GiB or 500MB") from error
        if result[device] < 0:
            raise EngineError(f"handler.max_memory[{key!r}] is negative")
    if dropped:
        progress(f"handler.max_memory: this worker runs on CPU, ignoring GPU id(s) {dropped}")
    if not any(device != "disk" for device in result):
        raise EngineError("handler.max_memory gives no memory to any GPU or to cpu; every layer would go to disk")
    # GPUs first, then cpu, then disk: the order infer_auto_device_map fills them in
    return dict(sorted(result.items(), key=lambda item: _device_rank(item[0])))


def _available_host_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def _device_rank(device: Device) -> Tuple[int, int]:
    return (0, device) if isinstance(device, int) else (1 if device == "cpu" else 2, 0)


def resolve_offload_folder(configured: Optional[str], model_dir: Path) -> Optional[Path]:
    """The configured offload folder, resolved inside the model folder (symlinks followed); None if unset."""
    if not configured:
        return None
    if os.path.isabs(configured):
        raise EngineError(f"handler.offload_folder {configured!r} is absolute; it must be a folder inside the model "
                          "folder (relative), or left unset for a temporary folder")
    root = Path(model_dir).resolve()
    folder = (root / configured).resolve()
    if folder != root and root not in folder.parents:
        raise EngineError(f"handler.offload_folder {configured!r} resolves to {folder}, outside the model folder "
                          f"{root}; name a folder inside it, or leave it unset for a temporary folder")
    if folder == root:
        raise EngineError("handler.offload_folder must be a sub-folder of the model folder, "
                          "not the model folder itself")
    return folder


def make_offload_dir(configured: Optional[Path]) -> Path:
    """A fresh folder of this load for offloaded weights: `<offload_folder>/worker-<pid>-<random>`, or
    `$TMPDIR/ts_plugin-offload-<pid>-<random>`. Folders left by processes that no longer run (a worker
    killed with SIGKILL cannot clean up) are removed first."""
    pid = os.getpid()
    if configured is not None:
        configured.mkdir(parents=True, exist_ok=True)
        _remove_stale(configured, re.compile(r"worker-(\d+)-.*"))
        return Path(tempfile.mkdtemp(prefix=_WORKER_PREFIX.format(pid=pid), dir=configured))
    base = Path(tempfile.gettempdir())
    _remove_stale(base, re.compile(r"ts_plugin-offload-(\d+)-.*"))
    return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX.format(pid=pid)))


def _remove_stale(folder: Path, pattern: "re.Pattern[str]") -> None:
    import psutil

    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not psutil.pid_exists(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


# --- the model -----------------------------------------------------------------------------------

def device_of(name: str, device_map: DeviceMap) -> Optional[Device]:
    """The device the map gives to a parameter or module name (the longest matching prefix)."""
    best = None
    for key, device in device_map.items():
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best[0]):
                best = (key, device)
    return best[1] if best else None


def no_split_classes(model: torch.nn.Module, configured: Optional[List[str]]) -> List[str]:
    """handler.no_split_module_classes, checked against the model; else the model's `_no_split_modules`."""
    present = {type(module).__name__ for module in model.modules()}
    if configured is None:
        return sorted(getattr(model, "_no_split_modules", None) or [])
    unknown = [name for name in configured if name not in present]
    if unknown:
        raise EngineError(f"handler.no_split_module_classes names {', '.join(map(repr, unknown))}, not a module class "
                          f"of {type(model).__name__}; its classes include "
                          f"{', '.join(sorted(present - {'ModuleList', 'Linear', 'Embedding', 'Dropout'})[:10])}")
    return list(configured)


def compute_device_map(model: torch.nn.Module, handler: HandlerConfig, dtype: torch.dtype, gpus: int,
                       progress: Progress) -> DeviceMap:
    """handler.device_map as given (a dict), or computed by Accelerate for a strategy (default auto)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import check_device_map, get_balanced_memory, get_max_memory

    spec = handler.device_map if handler.device_map is not None else "auto"
    if isinstance(spec, dict):
        device_map = {name: device_value(value, f"handler.device_map[{name!r}]") for name, value in spec.items()}
        bad = sorted({d for d in device_map.values() if isinstance(d, int) and d >= gpus})
        if bad:
            raise EngineError(f"handler.device_map places modules on GPU {bad}, but this worker sees {gpus} GPU(s)")
        modules = dict(model.named_modules())
        missing = [name for name in device_map if name not in modules]
        if missing:
            raise EngineError(f"handler.device_map names {', '.join(map(repr, missing[:5]))}, not a module of "
                              f"{type(model).__name__} (top-level modules: "
                              f"{', '.join(name for name, _ in model.named_children())})")
        try:
            check_device_map(model, device_map)
        except ValueError as error:
            raise EngineError(f"handler.device_map does not place every parameter: {error}") from error
        return device_map
    if spec not in STRATEGIES:
        raise EngineError(f"handler.device_map {spec!r} is not one of {', '.join(STRATEGIES)} "
                          "or a module -> device dict")
    max_memory = max_memory_for(handler.max_memory, gpus, progress)
    no_split = no_split_classes(model, handler.no_split_module_classes)
    if spec == "sequential":
        max_memory = get_max_memory(dict(max_memory) if max_memory else None)
    else:
        max_memory = get_balanced_memory(model, max_memory=dict(max_memory) if max_memory else None,
                                         no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=spec == "balanced_low_0")
    if not gpus:
        max_memory = {k: v for k, v in max_memory.items() if not isinstance(k, int)}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                       offload_buffers=handler.offload_buffers)
    return dict(device_map)


def main_device(device_map: DeviceMap) -> torch.device:
    """Where inputs go: the first GPU in the map (as accelerate's dispatch_model picks it), else the CPU."""
    for device in device_map.values():
        if isinstance(device, int):
            return torch.device("cuda", device)
    return torch.device("cpu")


def describe_device_map(model: torch.nn.Module, device_map: DeviceMap) -> str:
    """One readable line: modules in model order, consecutive ones on one device grouped, numbered runs
    collapsed, e.g. `model.embed_tokens, model.layers.0-5 -> cpu | model.layers.6-7, model.norm, lm_head -> disk`."""
    if list(device_map) == [""]:
        return f"the whole model -> {device_map['']}"
    modules = dict(model.named_modules())
    order = {name: index for index, name in enumerate(modules)}
    units: List[Tuple[int, str, Device]] = []
    for name, device in device_map.items():
        module = modules.get(name)
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) and len(module):
            units.extend((order[f"{name}.{child}"], f"{name}.{child}", device) for child, _ in module.named_children())
        else:
            units.append((order.get(name, len(order)), name, device))
    units.sort()
    groups: List[Tuple[Device, List[str]]] = []
    for _, name, device in units:
        if groups and groups[-1][0] == device:
            groups[-1][1].append(name)
        else:
            groups.append((device, [name]))
    return " | ".join(f"{_collapse(names)} -> {_device_name(device)}" for device, names in groups)


def _device_name(device: Device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _collapse(names: List[str]) -> str:
    """model.layers.0, model.layers.1, model.layers.2 -> model.layers.0-2"""
    out: List[str] = []
    run: Optional[Tuple[str, int, int]] = None
    for name in names + [""]:
        match = re.fullmatch(r"(.*)\.(\d+)", name)
        if run and match and match.group(1) == run[0] and int(match.group(2)) == run[2] + 1:
            run = (run[0], run[1], int(match.group(2)))
            continue
        if run:
            out.append(f"{run[0]}.{run[1]}" + (f"-{run[2]}" if run[2] != run[1] else ""))
            run = None
        if match:
            run = (match.group(1), int(match.group(2)), int(match.group(2)))
        elif name:
            out.append(name)
    return ", ".join(out)


def bytes_per_device(model: torch.nn.Module, device_map: DeviceMap, dtype: torch.dtype) -> Dict[str, int]:
    """Parameter bytes placed on each device (as the map says; offloaded ones are on meta in the model)."""
    totals: "OrderedDict[str, int]" = OrderedDict()
    for name, param in model.named_parameters():
        placed = device_of(name, device_map)
        device = _device_name(placed) if placed is not None else "?"
        size = param.numel() * (param.element_size() if not param.is_floating_point() else torch.finfo(dtype).bits // 8)
        totals[device] = totals.get(device, 0) + size
    return totals


def checkpoint_files(model_path: Path) -> List[Path]:
    files = sorted(model_path.glob("*.safetensors")) or sorted(model_path.glob("*.bin"))
    if not files:
        raise EngineError(f"no *.safetensors or *.bin checkpoint in {model_path}")
    return files


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


# --- loading -------------------------------------------------------------------------------------

def _load_with_device_map(model_path: Path, dtype: torch.dtype, handler: HandlerConfig, device_map: DeviceMap,
                          offload_folder: Optional[str]) -> torch.nn.Module:
    """transformers' own loading into the map: it applies the model's checkpoint key mapping (GPT-NeoX's embed_out
    is its lm_head), ties weights and offloads to disk, tensor by tensor. A weight missing from the checkpoint
    would be initialised at random with a warning: refused instead."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=dtype, device_map=device_map, offload_folder=offload_folder,
        offload_buffers=handler.offload_buffers, trust_remote_code=handler.trust_remote_code,
        output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise EngineError(f"the checkpoint does not hold {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                          "transformers would initialise them at random. Check that the model folder's weights "
                          "match its config.")
    return model


def load(context: LoadContext) -> DispatchedModel:
    """Build, place and load the model; return a step model with `device_map` and `offload_dir`."""
    from accelerate import dispatch_model

    handler, model_path, dtype, progress = context.config.handler, context.model_path, context.dtype, context.progress
    device = context.device
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    offload_root = resolve_offload_folder(handler.offload_folder, context.model_dir)
    files = checkpoint_files(model_path)
    shard = max(f.stat().st_size for f in files)
    progress(f"accelerate: {len(files)} checkpoint file(s), {_mib(sum(f.stat().st_size for f in files))}, "
             f"largest {_mib(shard)}; {gpus} GPU(s) visible (peak RSS {peak_rss_mb():.0f} MiB)")

    if handler.low_cpu_mem_usage:
        model = build_meta_model(model_path, dtype, handler.trust_remote_code)
    else:  # the whole model in host memory first (for models whose code the empty-weights path cannot build)
        model = load_causal_lm(model_path, dtype, handler.trust_remote_code)
    device_map = compute_device_map(model, handler, dtype, gpus, progress)
    if set(device_map.values()) == {"disk"}:
        raise EngineError("the device map puts the whole model on disk; give handler.max_memory more cpu (or GPU) "
                          "memory, at least the size of the largest layer")
    offload_dir = make_offload_dir(offload_root) if "disk" in device_map.values() else None
    strategy = "dict" if isinstance(handler.device_map, dict) else handler.device_map or "auto"
    progress(f"accelerate: loading with device_map {strategy}"
             + (f", offloading to {offload_dir}" if offload_dir else ""))
    folder = str(offload_dir) if offload_dir else None
    try:
        if handler.low_cpu_mem_usage:
            del model  # the skeleton only served to compute the map
            model = _load_with_device_map(model_path, dtype, handler, device_map, folder)
        else:
            model = dispatch_model(model, device_map=device_map, offload_dir=folder,
                                   offload_buffers=handler.offload_buffers,
                                   skip_keys=getattr(model, "_skip_keys_device_placement", None))
    except BaseException:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
        raise
    model.eval()
    if handler.onednn_lm_head:
        note = use_onednn_head(model)
        if note:
            progress(note)
    release_memory()
    sizes = ", ".join(f"{name} {_mib(size)}" for name, size in bytes_per_device(model, device_map, dtype).items())
    progress(f"device map: {describe_device_map(model, device_map)}")
    progress(f"accelerate: placed {sizes}; peak RSS {peak_rss_mb():.0f} MiB")
    return DispatchedModel(model, main_device(device_map), device_map, offload_dir,
                           compile_step=handler.compile_step, progress=progress)
