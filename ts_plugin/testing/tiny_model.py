"""Tiny random-weight HuggingFace models and a locally trained tokenizer (nothing is downloaded).

Used by the tests, the demo and the benchmark.

Example:
    >>> from ts_plugin.testing.tiny_model import make_tiny_model
    >>> make_tiny_model("/tmp/tiny-llama", arch="llama")  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

#: model_type -> the architecture's own quirk kept in the tiny model (GQA where it has it)
ARCHS = {
    "llama": {"num_key_value_heads": 2, "tie_word_embeddings": False},
    "mistral": {"num_key_value_heads": 2, "sliding_window": 4},  # a window shorter than the tests' sequences
    "qwen2": {"num_key_value_heads": 2},  # q/k/v biases
    "phi3": {"num_key_value_heads": 2},  # fused qkv_proj and gate_up_proj
    "gpt_neox": {},  # fused query_key_value; the checkpoint's embed_out is the model's lm_head
    "phi": {},  # partial rotary, parallel attention and MLP
    "opt": {},  # learned positions, tied embeddings, biases everywhere
    "gpt2": {},  # Conv1D layers, tied embeddings
}

_CORPUS = (
    "the quick brown fox jumps over the lazy dog . large models are served by torchserve with "
    "pipeline and tensor parallelism on many devices . a request carries a prompt and parameters , "
    "the server answers with generated text . tokens flow through stages ; ranks agree on every step . "
    "hello world ! how are you today ? numbers 0 1 2 3 4 5 6 7 8 9 and letters a b c d e f g h i j k l m "
    "n o p q r s t u v w x y z ."
)


def make_tokenizer(path: Union[str, Path], vocab_size: int = 512):
    """Train a small byte-level BPE tokenizer on a fixed corpus and save it to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    return fast


def make_tiny_model(path: Union[str, Path], arch: str = "llama", layers: int = 4, hidden: int = 64,
                    seed: int = 0, shards: int = 1, safetensors: bool = True, init_range: float = 0.3,
                    **overrides) -> Path:
    """Save a random-weight causal LM and its tokenizer as a HuggingFace model folder; `overrides` go into the
    model's config (e.g. num_attention_heads=6).

    `init_range` is larger than the usual 0.02 so that logits are peaked and greedy decoding does not
    hinge on near-ties (which tiny numeric differences between parallel layouts would flip).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, initializer_range=init_range)
    if arch == "opt":
        sizes = dict(hidden_size=hidden, ffn_dim=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
                     max_position_embeddings=256, word_embed_proj_dim=hidden, init_std=init_range)
    elif arch == "gpt2":
        sizes = dict(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    else:
        sizes = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
                     max_position_embeddings=256)
    config = transformers.AutoConfig.for_model(arch, **{**common, **sizes, **ARCHS[arch], **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    max_shard = f"{max(1, model.num_parameters() * 4 // shards // 1024 + 1)}KB" if shards > 1 else "10GB"
    model.save_pretrained(str(path), safe_serialization=safetensors, max_shard_size=max_shard)
    return path
