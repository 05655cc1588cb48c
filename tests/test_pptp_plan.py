"""The pptp sharding plan comes from the model's own tensor-parallel plan; models without one are refused."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from ts_plugin.testing import make_tiny_model

    root = tmp_path_factory.mktemp("plan")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in ("llama", "gpt2", "opt", "phi3")}


def test_llama_stage_plan_covers_only_its_layers(models):
    import torch
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from ts_plugin.engines._checkpoint import build_meta_model
    from ts_plugin.engines.pptp import tensor_parallel_plan

    model = build_meta_model(models["llama"], torch.float32)
    plan = tensor_parallel_plan(model, "model.layers", 2, 4)
    assert set(plan) == {f"model.layers.{i}.{name}" for i in (2, 3) for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert isinstance(plan["model.layers.2.self_attn.q_proj"], ColwiseParallel)
    assert isinstance(plan["model.layers.3.mlp.down_proj"], RowwiseParallel)


@pytest.mark.parametrize("arch, layers, refusal", [
    ("gpt2", "transformer.h", "GPT2LMHeadModel has no tensor-parallel plan"),
    ("opt", "model.decoder.layers", "OPTForCausalLM has no tensor-parallel plan"),
    # Phi-3's fused projections gather their output: not a plain column/row split
    ("phi3", "model.layers", "asks for 'colwise_gather_output' at layers.*.self_attn.qkv_proj"),
])
def test_model_without_a_plain_plan_is_refused_by_name(models, arch, layers, refusal):
    import torch

    from ts_plugin.engines.base import EngineError
    from ts_plugin.engines._checkpoint import build_meta_model
    from ts_plugin.engines.pptp import tensor_parallel_plan

    model = build_meta_model(models[arch], torch.float32)
    with pytest.raises(EngineError, match=refusal.replace("*", r"\*")):
        tensor_parallel_plan(model, layers, 0, 2)
