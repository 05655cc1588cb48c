"""Loading HuggingFace model folders, shared by the engines."""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


class EngineError(RuntimeError):
    """The engine cannot serve this model with this config; the message says what to change."""


def load_causal_lm(model_path: Path, dtype: torch.dtype, trust_remote_code: bool = False, **kwargs):
    """from_pretrained on CPU with low memory use (safetensors or .bin, single or sharded)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, low_cpu_mem_usage=True,
                                                 trust_remote_code=trust_remote_code, **kwargs)
    return model.eval()


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
