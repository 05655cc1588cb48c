"""parallelType tp loading only each rank's slices: the DeepSpeed engine under `torchrun --nproc-per-node 2`
(gloo on CPU), checked token for token against single-process HuggingFace `generate` and against the
whole-model path (the same weights as a .bin checkpoint, which is read whole). Plus the memory it holds
while loading, and the slice rules in-process."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from _llm import REPO, TORCHRUN, load_on_two_ranks
from test_pipeline_engine import legacy_bin_checkpoint
from ts_plugin.testing import free_ports, make_tiny_model, make_tokenizer

PROMPTS = ["hello world how are", "the quick brown fox jumps over the lazy dog .", "a request"]
MAX_NEW = 10

# Runs on both ranks: loads every model folder with the tp handler and generates greedily for PROMPTS
# (every rank runs every batch, as under TorchServe); each rank writes its token ids and log lines.
SCRIPT = textwrap.dedent(r'''
    import json, logging, os, sys
    from pathlib import Path

    import torch

    from ts_plugin.engines import _cpu_kernels
    from ts_plugin.engines._cpu_tp import deepspeed_layer_forwards
    from ts_plugin.handlers import LLMHandler
    from ts_plugin.testing import worker_context

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    lines = []
    keep = logging.Handler()
    keep.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("ts_plugin").addHandler(keep)
    out_dir, prompts, max_new = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    results = {}
    for case in sys.argv[4:]:
        model_dir = out_dir / case
        config = json.loads((model_dir / "tp.json").read_text())
        lines.clear()
        handler = LLMHandler()
        handler.initialize(worker_context(model_dir, config))
        rows = [{"body": json.dumps({"inputs": p, "parameters": {"max_new_tokens": max_new}}).encode()}
                for p in prompts]
        answers = handler.inference(handler.preprocess(rows))
        # the engine's lean layer forwards against DeepSpeed's own, on the same shard: the same bits (more rows than
        # small_linear takes, and aten's linear past them: the sums of small_linear and oneDNN, in other orders,
        # tests/test_cpu_kernels.py checks)
        module = handler.model.model
        ids = (torch.arange(_cpu_kernels._MOST_ROWS[0] + 4) * 7 + 3).remainder(50).view(1, -1)
        _cpu_kernels._ONEDNN_PAST[0] = False
        with torch.inference_mode():
            lean_logits = module(input_ids=ids).logits
            with deepspeed_layer_forwards(module) as switched:
                stock_logits = module(input_ids=ids).logits
        results[case] = {"token_ids": [answer.token_ids for answer in answers], "log": list(lines),
                         "lean_layers": switched, "lean_is_stock": torch.equal(lean_logits, stock_logits)}
    (out_dir / f"rank{handler.ranks.rank}.json").write_text(json.dumps(results))
    os._exit(0)  # no gloo teardown race at exit
''')

CONFIG = {"minWorkers": 1, "maxWorkers": 1, "responseTimeout": 120, "deviceType": "cpu", "parallelType": "tp",
          "torchrun": {"nproc-per-node": 2}, "deepspeed": {"replace_with_kernel_inject": False},
          "handler": {"max_new_tokens": 16, "max_length": 128}}


def save_model(path: Path, family: str, shards: int = 2, **overrides) -> Path:
    """A random-weight model of `family` (GQA where it has it) with the local tokenizer, as sharded safetensors."""
    import torch
    import transformers

    tokenizer = make_tokenizer(path)
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, initializer_range=0.3, num_hidden_layers=3,
                  max_position_embeddings=256, hidden_size=64, num_attention_heads=4)
    if family == "opt":
        config = transformers.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, init_std=0.3, **{**common, **overrides})
    else:
        config = transformers.AutoConfig.for_model(family, **{**common, "intermediate_size": 128,
                                                              "num_key_value_heads": 2, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    shard_kb = model.num_parameters() * 4 // shards // 1024 + 1
    model.save_pretrained(str(path), max_shard_size=f"{shard_kb}KB")
    return path


def reference_ids(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        expected.append(new[:new.index(eos)] if eos in new else new)
    return expected


MODELS = {  # case -> (family, config overrides)
    "llama": ("llama", {"tie_word_embeddings": False}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    # q/k/v biases; 3 KV heads of 6 and MLP 192: DeepSpeed splits heads, MLP and LM head unevenly
    "qwen2": ("qwen2", {"tie_word_embeddings": False, "hidden_size": 96, "num_attention_heads": 6,
                        "num_key_value_heads": 3, "intermediate_size": 192}),
    "opt": ("opt", {}),  # tied, biases everywhere, learned positions
}
POLICY = {"LlamaDecoderLayer": ["self_attn.o_proj", "mlp.down_proj"]}
# more architectures, for parity only: each is read slice by slice or, where AutoTP fuses weights (GPT-NeoX's
# query_key_value), loaded whole. Phi-3 and GPT-2 are refused at load (test_a_model_autotp_cannot_run_is_refused).
OTHER_ARCHS = ("gpt_neox", "mistral")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-sliced")
    # first, so that its peak RSS growth is measured from the imports alone: about 50 MiB of fp32 weights
    save_model(root / "llama-50mb", "llama", shards=4, hidden_size=512, intermediate_size=1536,
               num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4)
    cases = ["llama-50mb"]
    for case, (family, overrides) in MODELS.items():
        save_model(root / case, family, **overrides)
        legacy_bin_checkpoint(Path(shutil.copytree(root / case, root / f"{case}-bin")))
        cases += [case, f"{case}-bin"]
    shutil.copytree(root / "llama", root / "llama-policy")
    cases.append("llama-policy")
    for arch in OTHER_ARCHS:
        make_tiny_model(root / arch, arch=arch, layers=3, shards=2)
        cases.append(arch)
    for case in cases:
        config = CONFIG if case != "llama-policy" else {**CONFIG, "deepspeed": {**CONFIG["deepspeed"],
                                                                                  "injection_policy": POLICY}}
        (root / case / "tp.json").write_text(json.dumps(config))
    script = root / "tp_sliced_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(root)}
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_ports(1)[0]),
           str(script), str(root), json.dumps(PROMPTS), str(MAX_NEW), *cases]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    return root, [json.loads((root / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def sliced(log) -> bool:
    return any(re.search(r"\] read [\d.]+ MiB of the model's", line) for line in log)


@pytest.mark.parametrize("case", list(MODELS))
def test_sliced_load_matches_generate_and_the_whole_model_path(runs, case):
    root, ranks = runs
    expected = reference_ids(root / case)
    for rank in ranks:
        new, old = rank[case], rank[f"{case}-bin"]
        assert sliced(new["log"]), new["log"]
        assert not sliced(old["log"])
        assert any("loading the whole model on every rank: the checkpoint is not safetensors" in line
                   for line in old["log"]), old["log"]
        assert new["token_ids"] == expected
        assert old["token_ids"] == expected
    assert ranks[0][case]["token_ids"] == ranks[1][case]["token_ids"]


@pytest.mark.parametrize("case", ["llama-50mb", "llama", "llama-tied", "qwen2", "opt", "opt-bin", "llama-policy"])
def test_lean_layer_forwards_compute_what_deepspeeds_do(runs, case):
    """Every AutoTP linear layer (7 per Llama/Qwen2 decoder layer, 6 per OPT layer, and the LM head) runs the lean
    forward, and the logits are bitwise DeepSpeed's own. (llama-50mb and qwen2 split the LM head's input between the
    ranks; with hidden 64 DeepSpeed's grain of 64 leaves it all on rank 0.)"""
    _, ranks = runs
    for rank in ranks:
        result = rank[case]
        layers = 4 if case == "llama-50mb" else 3
        expected = layers * (6 if case.startswith("opt") else 7) + 1
        assert result["lean_layers"] == expected, result["log"]
        assert any(f"{expected} tensor-parallel linear layers run the lean CPU forward" in line
                   for line in result["log"])
        assert result["lean_is_stock"]


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_other_architectures_match_generate(runs, arch):
    root, ranks = runs
    expected = reference_ids(root / arch)
    for rank in ranks:
        assert rank[arch]["token_ids"] == expected, rank[arch]["log"]


def test_a_model_autotp_shards_but_cannot_run_is_refused_at_load(tmp_path):
    """AutoTP splits Phi-3's fused qkv_proj, but transformers' Phi-3 slices its output by the whole model's head
    counts: DeepSpeed's own forward fails on every request. The worker must not reach READY with it."""
    model_dir = make_tiny_model(tmp_path / "phi3", arch="phi3", layers=2)
    (model_dir / "model-config.yaml").write_text(yaml.safe_dump(CONFIG))
    for message in load_on_two_ranks(model_dir, "model-config.yaml", tmp_path):
        assert message.startswith("EngineError: DeepSpeed sharded Phi3ForCausalLM over the ranks, but the sharded "
                                  "model cannot run"), message
        assert "parallelType pp or custom" in message


def test_injection_policy_is_read_slice_by_slice(runs):
    _, ranks = runs
    for rank in ranks:
        assert sliced(rank["llama-policy"]["log"])
        assert rank["llama-policy"]["token_ids"] == rank["llama"]["token_ids"]


def test_each_rank_reads_about_its_share(runs):
    """Peak RSS grows by about this rank's share of the weights (the whole-model path: by the model and more)."""
    _, ranks = runs
    for rank in ranks:
        line = next(line for line in rank["llama-50mb"]["log"] if sliced([line]))
        held, model, growth = (float(x) for x in re.search(
            r"read ([\d.]+) MiB of the model's ([\d.]+) MiB .* peak RSS \d+ MiB, \+?(-?\d+) MiB over", line).groups())
        assert model > 45 and abs(held - model / 2) < 0.05 * model, line
        assert growth < held + 12, line


def test_rank_block_follows_deepspeeds_layout_and_refuses_the_rest():
    from deepspeed.checkpoint.affine import contiguous_split_map, replicated_map, sub_param_map

    from ts_plugin.engines.deepspeed import _NotSliced, _rank_block

    rows = contiguous_split_map((6, 4), [4, 2], 0).to_dict()
    assert _rank_block(rows, 1, (2, 4), "w", True) == ((6, 4), (slice(4, 6), slice(0, 4)))
    columns = contiguous_split_map((6, 4), [3, 1], 1).to_dict()
    assert _rank_block(columns, 1, (6, 1), "w", True) == ((6, 4), (slice(0, 6), slice(3, 4)))
    empty = contiguous_split_map((6, 4), [4, 0], 1).to_dict()
    assert _rank_block(empty, 1, (6, 0), "w", True) == ((6, 4), (slice(0, 6), slice(0, 0)))
    assert _rank_block(replicated_map((6,), 2).to_dict(), 0, (6,), "b", True) == ((6,), None)
    assert _rank_block(None, 0, (6,), "norm", False) == ((6,), None)
    with pytest.raises(_NotSliced, match="does not say"):
        _rank_block(None, 0, (3, 4), "w", True)
    with pytest.raises(_NotSliced, match="not one block"):  # a shard shape DeepSpeed did not describe
        _rank_block(rows, 0, (3, 4), "w", True)
    fused = sub_param_map((6, 4), [2, 2, 2], [[1, 1], [1, 1], [1, 1]], 0).to_dict()  # q, k, v rows per rank
    with pytest.raises(_NotSliced, match="not one block"):
        _rank_block(fused, 0, (3, 4), "qkv", True)
