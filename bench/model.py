"""The benchmark's model: a random-weight Llama made locally from a config, saved as sharded safetensors,
with the locally trained tokenizer of ts_plugin.tiny_model. Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

#: about 200M parameters: 18 decoder layers of hidden 1024 (16 heads of 64, 4 KV heads), MLP 2816
FULL = dict(hidden=1024, intermediate=2816, layers=18, heads=16, kv_heads=4, shards=8)
#: the smoke run's model: tiny, loads in a fraction of a second
SMOKE = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, shards=2)


def make_model(path: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, shards: int,
               seed: int = 0, init_range: float = 0.3) -> Dict[str, int]:
    """Save the model (if not already there) and return {"parameters", "bytes"} of its weights.

    `init_range` 0.3 (as in ts_plugin.tiny_model) makes the random model's logits peaked, so that greedy
    decoding does not hinge on near-ties that float rounding differences between layouts would flip.
    """
    path = Path(path)
    marker = path / "bench-model.json"
    spec = dict(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads,
                shards=shards, seed=seed, init_range=init_range)
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("spec") == spec:
            return saved["size"]
    import torch
    import transformers

    from ts_plugin.tiny_model import make_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=init_range, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    parameters = model.num_parameters()
    size = {"parameters": parameters, "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "vocab": len(tokenizer)}
    shard_kb = max(1, size["bytes"] // shards // 1024 + 1)
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size=f"{shard_kb}KB")
    marker.write_text(json.dumps({"spec": spec, "size": size}))
    return size
