"""Loading HuggingFace model folders by parts, once for every engine: the meta-device model, the checkpoint's
files and index, the model's key mapping, tied weights, and reading a tensor or only a block of it.

The engines that load by parts (pp stages, tp slices, pptp stage slices) build the model here with
parameters on the meta device, map each model tensor to its checkpoint tensor the way `from_pretrained`
renames them, and read only what the rank keeps (`read_tensors` with `blocks`). A pipeline stage (pp, pptp)
keeps its own layers and the modules around them (`materialize_stage`).
"""
from __future__ import annotations

import gc
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .base import EngineError

logger = logging.getLogger(__name__)


class CheckpointError(EngineError):
    """The checkpoint lacks tensors the model needs, or holds them in a layout this loader does not convert."""

#: (model tensor name, full shape) -> the block of it this rank reads (None: the whole tensor)
Blocks = Callable[[str, Tuple[int, ...]], Optional[Tuple[slice, ...]]]


def load_causal_lm(model_path: Path, dtype: torch.dtype, trust_remote_code: bool = False, **kwargs):
    """from_pretrained on CPU with low memory use (safetensors or .bin, single or sharded)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, low_cpu_mem_usage=True,
                                                 trust_remote_code=trust_remote_code, **kwargs)
    return model.eval()


def build_meta_model(model_path: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM from its HF config with parameters on the meta device, tied as from_pretrained ties them.
    Buffers are real: non-persistent ones (rotary inv_freq, ...) are not in checkpoints."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise EngineError(f"ts_plugin serves decoder-only causal LMs; {type(config).__name__} is an "
                          "encoder-decoder model")
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise EngineError(f"ts_plugin serves HuggingFace causal LMs; {type(config).__name__} has no "
                          f"causal-LM class: {error}") from error
    model.tie_weights()  # from_config leaves e.g. a tied lm_head a tensor of its own
    _check_buffers(model)
    return model.eval()


def _check_buffers(model: torch.nn.Module) -> None:
    on_meta = []
    for module_name, module in model.named_modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                on_meta.append(f"{module_name}.{name}" if module_name else name)
    if on_meta:
        raise EngineError(f"{type(model).__name__} builds non-persistent buffers on the meta device "
                          f"({', '.join(on_meta[:5])}); they are not in the checkpoint, so it cannot be loaded by "
                          "parts. With parallelType custom, set handler.low_cpu_mem_usage: false to load it with "
                          "from_pretrained.")


def checkpoint_index(model_path: Path) -> Dict[str, Path]:
    """Checkpoint tensor name -> file, for safetensors or .bin checkpoints, single or sharded (with an index)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return {name: model_path / file for name, file in weight_map.items()}
    files = sorted(model_path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        names: Dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as reader:
                names.update({name: file for name in reader.keys()})
        return names
    files = sorted(model_path.glob("pytorch_model*.bin"))
    if files:
        names = {}
        for file in files:
            state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
            names.update({name: file for name in state})
            del state
        return names
    raise EngineError(f"no checkpoint in {model_path}: expected *.safetensors or pytorch_model*.bin "
                      "(single or sharded with an index)")


def checkpoint_names(model: torch.nn.Module, index: Dict[str, Path]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """Model tensor name -> checkpoint name, renamed the way from_pretrained renames (transformers' conversion
    mapping: legacy names, base-model prefix added or stripped, per-model renames such as GPT-NeoX's
    embed_out -> lm_head). Also returns the model names that only a many-to-one conversion produces (e.g. fused
    expert tensors), which loading by parts does not perform."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    model_names = {name: True for name in model.state_dict(keep_vars=True)}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except ImportError:  # older transformers: only the base-model prefix differs
        rename_source_key = None
    names: Dict[str, str] = {}
    converted: Dict[str, str] = {}
    for key in index:
        if rename_source_key is not None:
            name, pattern = rename_source_key(key, renamings, converters, prefix or None, model_names)
            if pattern is not None:
                converted.setdefault(name, key)
                continue
        else:
            name = key
            if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in model_names:
                name = key[len(prefix) + 1:]
            elif prefix and f"{prefix}.{key}" in model_names:
                name = f"{prefix}.{key}"
        names.setdefault(name, key)
    return names, converted


def tied_names(model: torch.nn.Module) -> Dict[str, List[str]]:
    """Parameter name -> the names tied to it (both directions), as transformers ties them at load."""
    try:
        mapping = model.get_expanded_tied_weights_keys(all_submodels=True)
    except (AttributeError, TypeError, ValueError):
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        mapping = getattr(model, "_tied_weights_keys", None) if getattr(text, "tie_word_embeddings", False) else None
        mapping = dict(mapping) if isinstance(mapping, dict) else {}
    tied: Dict[str, List[str]] = {}
    for target, source in mapping.items():
        tied.setdefault(target, []).append(source)
        tied.setdefault(source, []).append(target)
    return tied


def checkpoint_key(name: str, names: Dict[str, str], tied: Dict[str, List[str]]) -> Optional[str]:
    """The checkpoint tensor behind a model tensor: its own, else (tied weights) a partner's."""
    key = names.get(name)
    for partner in tied.get(name, []):
        key = key or names.get(partner)
    return key


def read_tensors(wanted: Dict[str, str], index: Dict[str, Path],
                 blocks: Optional[Blocks] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(model name, CPU tensor in memory of its own) for each model name -> checkpoint name in `wanted`, reading
    only `blocks(name, full shape)` of each tensor where given.

    A safetensors file is opened per tensor: closing it unmaps the pages that read touched (a column block touches
    every page of its tensor), so at most one tensor's pages are resident beside what was read.
    """
    by_file: Dict[Path, List[Tuple[str, str]]] = {}
    for name, key in wanted.items():
        by_file.setdefault(index[key], []).append((name, key))
    for file, pairs in sorted(by_file.items()):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            for name, key in pairs:
                with safe_open(str(file), framework="pt", device="cpu") as reader:
                    block = blocks(name, tuple(reader.get_slice(key).get_shape())) if blocks else None
                    stored = reader.get_tensor(key) if block is None else reader.get_slice(key)[block]
                    tensor = stored.clone(memory_format=torch.contiguous_format)  # not a view of the mapping
                    del stored
                yield name, tensor
        else:
            state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
            for name, key in pairs:
                stored = state[key]
                block = blocks(name, tuple(stored.shape)) if blocks else None
                yield name, (stored if block is None else stored[block]).clone(memory_format=torch.contiguous_format)
            del state


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    gc.collect()
    try:  # return freed heap pages to the OS so RSS reflects what is held
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# --- loading only a pipeline stage's tensors (pp, pptp) ---------------------------------------------------

class _Skipped(torch.nn.Module):
    """Stands in for a decoder layer of another stage: returns its input (which the next hook replaces)."""

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs.get("hidden_states")


@dataclass
class StageInfo:
    index: int
    count: int
    layers_path: str
    start: int
    end: int
    num_layers: int
    stage_bytes: int
    model_bytes: int
    most_layers: int  # of any stage: the most layers whose keys and values one rank keeps

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


class Slicer:
    """What a rank keeps of each tensor of its stage (pptp: its tensor-parallel chunk)."""

    def block(self, name: str, shape: Tuple[int, ...]) -> Optional[Tuple[slice, ...]]:
        """The block of the full `shape`-d tensor `name` to read (None: all of it)."""
        return None

    def wrap(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor the model holds for what was read."""
        return tensor


def _module_of(model: torch.nn.Module, module: Optional[torch.nn.Module]) -> Optional[str]:
    if module is None:
        return None
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def materialize_stage(model: torch.nn.Module, stage: int, bounds: List[Tuple[int, int]], layers_path: str,
                      model_path: Path, device: torch.device, dtype: torch.dtype,
                      slicer: Optional[Slicer] = None) -> StageInfo:
    """Keep this stage's layers (other layers become pass-throughs), the input embedding on the first stage,
    the output embedding on the last, and the small modules around the layers (final norm, learned position
    table) everywhere; read only those tensors from the checkpoint, onto `device`. A `slicer`, when given, says
    which block of each tensor this rank reads and wraps what was read (pptp: a DTensor shard)."""
    layers = model.get_submodule(layers_path)
    start, end = bounds[stage]
    last = stage == len(bounds) - 1
    index = checkpoint_index(model_path)
    names, converted = checkpoint_names(model, index)  # before other stages' layers leave the model
    tied = tied_names(model)
    # the whole model's size as from_pretrained holds it (tied parameters once)
    model_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                      if not (name not in names and any(partner in names for partner in tied.get(name, []))))
    for i in range(len(layers)):
        if not start <= i < end:
            layers[i] = _Skipped()  # the meta parameters of other stages' layers are dropped here
    skip = []  # module prefixes whose tensors this stage leaves on meta
    input_name = _module_of(model, model.get_input_embeddings())
    output_name = _module_of(model, model.get_output_embeddings())
    if stage != 0 and input_name:
        skip.append(input_name + ".")
    if not last and output_name:
        skip.append(output_name + ".")

    # every parameter and persistent buffer, with all the names it has (tied parameters have several)
    slots: Dict[str, Tuple[torch.nn.Module, str, bool]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in itertools.chain(((a, t) for a, t in module._parameters.items()),
                                            ((a, t) for a, t in module._buffers.items()
                                             if a not in module._non_persistent_buffers_set)):
            if tensor is None:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            if any(name.startswith(prefix) for prefix in skip):
                continue
            slots[name] = (module, attr, attr in module._parameters)
    wanted: Dict[str, str] = {}
    missing = []
    for name, (module, attr, is_param) in slots.items():
        key = checkpoint_key(name, names, tied)
        if key is not None:
            wanted[name] = key
        elif is_param or getattr(module, attr).device.type == "meta":
            missing.append(name)
    if missing:
        hint = ""
        if any(name in converted for name in missing):
            hint = (f" {type(model).__name__}'s checkpoint stores them in another layout (transformers converts it "
                    "when loading the whole model); parallelType pp loads tensors one to one. Save the model with "
                    "transformers 5 (save_pretrained) first, or serve it with parallelType tp or custom.")
        raise CheckpointError(f"{len(missing)} tensor(s) of stage {stage} are not in the checkpoint {model_path}: "
                            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}.{hint}")
    stage_bytes = 0
    # checkpoint name -> the materialized tensor / Parameter: names tied to one checkpoint tensor share one
    # Parameter object, as in the single-process model
    shared: Dict[str, torch.Tensor] = {}
    parameters: Dict[str, torch.nn.Parameter] = {}
    for name, tensor in read_tensors(wanted, index, slicer.block if slicer else None):
        module, attr, is_param = slots[name]
        key = wanted[name]
        if key not in shared:
            current = getattr(module, attr)  # the skeleton's dtype: `dtype`, or what the model keeps in fp32
            target_dtype = current.dtype if tensor.is_floating_point() and current.is_floating_point() else tensor.dtype
            local = tensor.to(device=device, dtype=target_dtype)
            stage_bytes += local.numel() * local.element_size()  # what this rank holds, not a DTensor's global size
            shared[key] = slicer.wrap(name, local) if slicer is not None else local
        del tensor
        if is_param:
            if key not in parameters:
                parameters[key] = torch.nn.Parameter(shared[key], requires_grad=False)
            module._parameters[attr] = parameters[key]
        else:
            module._buffers[attr] = shared[key]
    del shared, parameters
    for module in model.modules():  # non-persistent buffers (rotary inv_freq, ...) were built on CPU
        for attr, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type != "meta" and buffer.device != device:
                module._buffers[attr] = buffer.to(device)
    release_memory()
    return StageInfo(stage, len(bounds), layers_path, start, end, len(layers), stage_bytes, model_bytes,
                     max(last - first for first, last in bounds))
