"""The output projection (lm_head) through oneDNN on CPU in float32, where ts_plugin's CPU kernels could not be
built.

A decode step's lm_head is a skinny matmul (a few rows by a vocabulary of 50k-150k), which PyTorch's default
CPU path (MKL's sgemm) ran at a fraction of memory bandwidth on some hosts, where oneDNN's linear read the weight
about twice as fast (docs/benchmarks.md, "The lm_head through oneDNN"). Where the kernels are built, the head stays
a plain nn.Linear and small_linear takes its decode rows, faster than both here (8 rows of SmolLM2's 576 x 49,152
head, repeated calls in isolation: 3.8-4.0 ms against oneDNN's 7-10 and MKL's 8-10, 2026-12-07) and without a
copy. The logits agree with the default path to float32 rounding. Where the head's weight is its own (untied, or
a pp last stage without the input embedding), the oneDNN copy replaces it; where the input embedding shares it,
the copy sits beside it (vocab x hidden x 4 bytes).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _cpu_kernels


class OneDNNLinear(torch.nn.Module):
    """A bias-free or biased nn.Linear whose weight is held in oneDNN's layout."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_onednn", linear.weight.detach().to_mkldnn(), persistent=False)
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)
        self.register_buffer("bias_onednn", bias.to_mkldnn(), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, self.in_features).to(torch.float32).contiguous()
        out = torch._C._nn.mkldnn_linear(flat.to_mkldnn(), self.weight_onednn, self.bias_onednn).to_dense()
        return out.reshape(*hidden.shape[:-1], self.out_features)


def use_onednn_head(model: torch.nn.Module) -> Optional[str]:
    """Compute `model`'s output projection through oneDNN where it is a plain float32 nn.Linear on CPU (not
    offloaded, not sharded) and ts_plugin's CPU kernels could not be built (where they are, small_linear takes
    the head's decode rows); returns what was done, for the log, or None where nothing was."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if (type(head) is not torch.nn.Linear or type(weight) is not torch.nn.Parameter or weight.device.type != "cpu"
            or weight.dtype != torch.float32 or getattr(head, "_hf_hook", None) is not None
            or not torch.backends.mkldnn.is_available() or _cpu_kernels.load_cpu_kernels() is None):
        return None
    shared = any(parameter is weight for name, parameter in model.named_parameters(remove_duplicate=False)
                 if not name.startswith(_module_name(model, head) + "."))
    model.set_output_embeddings(OneDNNLinear(head))
    size = weight.numel() * weight.element_size() / 2**20
    return (f"lm_head through oneDNN ({head.out_features} x {head.in_features}; "
            + (f"a {size:.0f} MiB copy beside the tied input embedding)" if shared else "in place of its weight)"))


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)
