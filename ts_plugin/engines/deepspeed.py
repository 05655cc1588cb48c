"""parallelType tp: DeepSpeed inference (AutoTP by default) over the worker's ranks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist

from ..config import ModelConfig, ParallelLayout
from ..distributed import Ranks
from ..generation import HFStepModel
from ._hf import EngineError, Progress, load_causal_lm, peak_rss_mb, release_memory


def inference_config(config: ModelConfig, layout: ParallelLayout, model_dir: Path, device: torch.device,
                     dtype: torch.dtype) -> Dict[str, Any]:
    """DeepSpeed init_inference settings: the JSON file, then the inline `deepspeed` keys on top."""
    section = config.deepspeed
    settings: Dict[str, Any] = {}
    if section is not None and section.config:
        settings.update(json.loads((model_dir / section.config).read_text(encoding="utf-8")))
    if section is not None:
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


def load(config: ModelConfig, layout: ParallelLayout, ranks: Ranks, model_path: Path, model_dir: Path,
         device: torch.device, dtype: torch.dtype, progress: Progress) -> HFStepModel:
    """Load the HF model on every rank and shard it with DeepSpeed; returns this rank's step model."""
    import deepspeed

    settings = inference_config(config, layout, model_dir, device, dtype)
    if device.type == "cpu":
        # DeepSpeed's JIT shared-memory allreduce crashes on CPU hosts (see README); gloo's is used instead.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    progress(f"reading checkpoint {model_path} (peak RSS {peak_rss_mb():.0f} MiB)")
    model = load_causal_lm(model_path, dtype, config.handler.trust_remote_code)
    if "injection_policy" in settings:
        settings["injection_policy"] = _injection_policy(model, settings["injection_policy"])
    progress(f"sharding {type(model).__name__} with DeepSpeed tp_size={layout.tp_size} "
             f"({'kernel injection' if settings['replace_with_kernel_inject'] else 'AutoTP'})")
    try:
        engine = deepspeed.init_inference(model, config=settings)
    except Exception as error:  # noqa: BLE001 - DeepSpeed raises bare Exceptions/AssertionErrors
        if "AutoTP not supported" in str(error) or "kernel injection" in str(error):
            raise EngineError(
                f"DeepSpeed AutoTP cannot shard {type(model).__name__}: {error}. Give deepspeed.injection_policy "
                "(module class -> names of the layers whose output is all-reduced), or use kernel injection on a "
                "GPU host (replace_with_kernel_inject: true), or serve this model with parallelType pp.") from error
        raise
    module = engine.module.to(device)
    del model
    release_memory()
    progress(f"shard ready (peak RSS {peak_rss_mb():.0f} MiB)")
    return HFStepModel(module, device, share=_broadcast_from_driver if ranks.world_size > 1 else None,
                       samples_here=ranks.is_driver)


def _broadcast_from_driver(tokens: torch.Tensor) -> torch.Tensor:
    # one small collective per step keeps every rank on rank 0's tokens, whatever float noise says
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = tokens.to(device)
    dist.broadcast(buffer, src=0)
    return buffer.cpu()
