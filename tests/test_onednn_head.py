"""The lm_head through oneDNN on CPU: the same logits to float32 rounding and the same greedy tokens as the
default path, the untied weight replaced and a tied one kept for the input embedding; other heads untouched."""
from __future__ import annotations

import pytest
import torch

from ts_plugin.engines._onednn_head import OneDNNLinear, use_onednn_head


@pytest.fixture(params=["llama", "gpt2"])
def model_path(request, tmp_path_factory):
    from ts_plugin.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("head") / request.param, arch=request.param), request.param


def test_the_onednn_head_gives_the_default_heads_logits_and_tokens(model_path):
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


def test_heads_that_are_not_plain_float32_cpu_linears_are_left_alone(model_path):
    from transformers import AutoModelForCausalLM

    path, _ = model_path
    half = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    assert use_onednn_head(half) is None and type(half.get_output_embeddings()) is torch.nn.Linear
