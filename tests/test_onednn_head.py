"""The lm_head through oneDNN on CPU where ts_plugin's CPU kernels could not be built: the same logits to float32
rounding and the same greedy tokens as the default path, the untied weight replaced and a tied one kept for the
input embedding; other heads untouched, and the head left to small_linear where the kernels are built."""
from __future__ import annotations

import pytest
import torch

from ts_plugin.engines import _cpu_kernels
from ts_plugin.engines._onednn_head import OneDNNLinear, use_onednn_head


@pytest.fixture(params=["llama", "gpt2"])
def model_path(request, tmp_path_factory):
    from ts_plugin.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("head") / request.param, arch=request.param), request.param


@pytest.fixture
def no_kernels(monkeypatch):
    """As on a host without a compiler: the kernels failed to build."""
    monkeypatch.setattr(_cpu_kernels, "KERNELS", [None])


def test_the_onednn_head_gives_the_default_heads_logits_and_tokens(model_path, no_kernels):
    from transformers import AutoModelForCausalLM

    path, arch = model_path
    reference = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    note = use_onednn_head(model)
    assert isinstance(model.get_output_embeddings(), OneDNNLinear)
    tied = reference.config.tie_word_embeddings
    assert ("copy beside the tied input embedding" if tied else "in place of its weight") in note
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert not any(name.startswith("lm_head.") for name in names) or tied
    ids = torch.randint(0, reference.config.vocab_size, (3, 11))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        kwargs = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_heads_that_are_not_plain_float32_cpu_linears_are_left_alone(model_path, no_kernels):
    from transformers import AutoModelForCausalLM

    path, _ = model_path
    half = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    assert use_onednn_head(half) is None and type(half.get_output_embeddings()) is torch.nn.Linear


def test_where_the_kernels_are_built_small_linear_takes_the_head(model_path):
    from transformers import AutoModelForCausalLM

    path, _ = model_path
    if _cpu_kernels.load_cpu_kernels() is not None:
        pytest.skip("the CPU kernels do not build here")
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert use_onednn_head(model) is None and type(model.get_output_embeddings()) is torch.nn.Linear
    assert _cpu_kernels.use_small_batch_linears(model) > 0 and model.get_output_embeddings()._small_batch
