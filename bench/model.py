"""The benchmark's model: a random-weight Llama made locally from a config, saved as sharded safetensors, with
ts_plugin.testing's locally trained tokenizer (nothing is downloaded); and HF generate's answers, the ground truth."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

#: about 200M parameters: 18 decoder layers of hidden 1024 (16 heads of 64, 4 KV heads), MLP 2816
FULL = dict(hidden=1024, intermediate=2816, layers=18, heads=16, kv_heads=4, shards=8)
#: the smoke run's model: tiny, loads in a fraction of a second
SMOKE = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, shards=2)


def make_model(path: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
               shards: int) -> Dict[str, int]:
    """Save the model with ts_plugin.testing's tiny-model builder (unless it is already there) and return
    {"parameters", "bytes"} of its weights."""
    from ts_plugin.testing import make_tiny_model

    path, spec = Path(path), dict(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                                  kv_heads=kv_heads, shards=shards)
    marker = path / "bench-model.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("spec") != spec:
        make_tiny_model(path, "llama", layers=layers, hidden=hidden, shards=shards, intermediate_size=intermediate,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512)
        weights = sum(file.stat().st_size for file in path.glob("*.safetensors"))  # fp32 (headers: a few KiB)
        marker.write_text(json.dumps({"spec": spec, "size": {"parameters": weights // 4, "bytes": weights}}))
    return json.loads(marker.read_text())["size"]


def reference_answers(model, tokenizer, jobs: Iterable[Tuple[str, int]]) -> List[Tuple[List[int], str]]:
    """Greedy HF `generate`, one (prompt, max new tokens) at a time: the ground truth every layout must match, as
    (token ids up to the end of sequence, text)."""
    import torch

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    answers = []
    for prompt, max_new in jobs:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            new = model.generate(**ids, max_new_tokens=max_new, do_sample=False)[0, ids["input_ids"].shape[1]:]
        new = new.tolist()
        new = new[:next((i for i, token in enumerate(new) if token in eos_ids), len(new))]
        answers.append((new, tokenizer.decode(new, skip_special_tokens=True)))
    return answers
