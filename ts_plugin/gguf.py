"""Turn a GGUF checkpoint into a HuggingFace model folder that every engine loads.

The engines read safetensors shards by tensor name (pp stages, tp slices, pptp chunks), so a GGUF
file is dequantised once, through transformers' own `gguf_file=` reader, and saved as a plain folder
with its tokenizer and chat template.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union, get_args

from .config.schema import DTypeName

DTYPES = get_args(DTypeName)
_MARKER = "ts_plugin_gguf.json"  # records which file a folder came from, so a second call reuses it


def convert_gguf(gguf_file: Union[str, Path], out_dir: Union[str, Path], dtype: str = "float32") -> Path:
    """Dequantise `gguf_file` into the HF model folder `out_dir` (model.safetensors, config, tokenizer).

    A folder already converted from the same file (same size and mtime) is reused as it is.

    Example:
        >>> from ts_plugin.gguf import convert_gguf
        >>> folder = convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")  # doctest: +SKIP
        >>> # then: handler.model_path: /abs/path/to/smollm2 in model-config.yaml
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    gguf_file, out_dir = Path(gguf_file).resolve(), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    stat = gguf_file.stat()
    source = {"gguf_file": str(gguf_file), "size": stat.st_size, "mtime": stat.st_mtime, "dtype": dtype}
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == source:
        return out_dir

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype),
                                                 trust_remote_code=False)
    # the weights are plain tensors once dequantised; the GGUF quantizer only blocks saving them
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps(source), encoding="utf-8")
    return out_dir
