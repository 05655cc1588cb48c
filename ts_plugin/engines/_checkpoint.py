"""Loading HuggingFace model folders by parts, once for every engine: the meta-device model, the checkpoint's
files and index, the model's key mapping, tied weights, and reading a tensor or only a block of it.

The engines that load by parts (pp stages, tp slices, pptp stage slices) build the model here with
parameters on the meta device, map each model tensor to its checkpoint tensor the way `from_pretrained`
renames them, and read only what the rank keeps (`read_tensors` with `blocks`).
"""
from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .base import EngineError

logger = logging.getLogger(__name__)

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
