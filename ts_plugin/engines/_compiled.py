"""`handler.compile_step`: a step's forward compiled by `torch.compile` (inductor) into one graph, so the norms, rotary embeddings, residual adds and activations between the linears run as a few fused kernels
instead of a few hundred small ops each dispatched from Python.

What dynamo cannot trace is one opaque op in the graph (torch.library custom ops): the paged attention (`ts_plugin::paged_attention`, reading
the step's PagedBatch from `compiled_step`), small_linear (`ts_plugin::small_linear`) and tp's all-reduce
(`ts_plugin::inference_all_reduce_`). So it neither breaks at the attention nor at tp's collectives.

The step's sizes (tokens, rows) are marked unbacked, so one graph serves every step, one token and one row
included. It compiles at load, on a scratch KV pool: 30-140 s on a 2-CPU host, which startupTimeout must cover
(rule TSP225). The warm-up steps (one token, one row, several of each) compare their logits with the eager
forward's; a compile error or a difference makes the model run eagerly, said once in the log, as graph breaks are.
A pp stage compiles only its decoder layers (`compile_layers`): its forward ends by raising from a hook and takes
the previous stage's hidden states through another (engines/pipeline.py), which stay eager around the graph.
Measured: docs/benchmarks.md, "The step compiled"; untried on GPU (no device was lent).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..kv_blocks import BLOCK_SIZE
from ._paged import _INNER, NO_MASK, KVPool, PagedBatch, PagedRow, compiled_step

logger = logging.getLogger(__name__)

#: warm-up steps (block ids, length, new tokens per row): prefills, decodes and a prefill chunk, one row and several
WARM_UP: List[List[PagedRow]] = [
    [PagedRow([0], 5, 5), PagedRow([1], 3, 3)],
    [PagedRow([0], 6, 1), PagedRow([1], 4, 1), PagedRow([2], 1, 1)],
    [PagedRow([0], 7, 1)],
    [PagedRow([2], 5, 4)],
]
#: the step inputs' dimensions that vary from step to step (tokens, rows)
_STEP_DIMS = {"input_ids": 1, "position_ids": 1, "logits_to_keep": 0}
#: the most a compiled step's logits may differ from the eager step's, relative to the largest logit
TOLERANCE = 1e-3

Forward = Callable[[PagedBatch, Dict[str, Any]], Any]


def compile_forward(model: torch.nn.Module, step_inputs: Callable[[torch.Tensor, PagedBatch], Dict[str, Any]],
                    progress: Optional[Callable[[str], None]] = None) -> Optional[Forward]:
    """Compile `model`'s forward for paged steps and check it against the eager one; returns the compiled forward
    (called as `forward(batch, inputs)`, inputs from `step_inputs(ids, batch)`), or None where the model runs
    eagerly (said once through `progress` and the log).

    Example::

        forward = compile_forward(model, lambda ids, batch: {"input_ids": ids.view(1, -1), ...})
        logits = forward(batch, inputs).logits if forward else model(**inputs, paged=batch).logits
    """
    modules: Dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if type(module) in _INNER:
            if module.layer_idx in modules:
                return say_eager(progress, f"two attention modules share layer_idx {module.layer_idx}")
            modules[module.layer_idx] = module
    compiled = torch.compile(model, dynamic=True)

    def forward(batch: PagedBatch, inputs: Dict[str, Any]) -> Any:
        for name, dim in _STEP_DIMS.items():  # any size, 1 included: one graph for every step
            if name in inputs:
                tensor = inputs[name]
                torch._dynamo.decorators.mark_unbacked(tensor, dim)
                if tensor._base is not None:  # a view's base is guarded on too (input_ids: [tokens] viewed)
                    torch._dynamo.decorators.mark_unbacked(tensor._base, tensor._base.dim() - 1)
        with compiled_step(batch, modules):
            return compiled(**inputs)

    breaks_before = graph_breaks()
    vocab = model.config.get_text_config().vocab_size
    eager_pool, compiled_pool = KVPool(BLOCK_SIZE), KVPool(BLOCK_SIZE)
    try:
        for rows in WARM_UP:  # inputs made outside inference mode, as the step loop makes them (a guard's key)
            ids = torch.arange(1, 1 + sum(row.new for row in rows)) % vocab
            eager_batch, batch = PagedBatch(eager_pool, rows), PagedBatch(compiled_pool, rows)
            eager_inputs, inputs = step_inputs(ids, eager_batch), step_inputs(ids, batch)
            with torch.inference_mode():
                eager = model(**eager_inputs, paged=eager_batch)
                difference = differs(eager.logits, forward(batch, inputs).logits)
                if difference:
                    return say_eager(progress, f"its logits {difference}")
    except Exception as error:  # noqa: BLE001 - any compile failure: the eager step serves, loudly
        return say_eager(progress, f"{type(error).__name__}: {str(error)[:300]}")
    say_compiled(breaks_before, progress)
    return forward


def compile_layers(layers: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """Decoder layers as one module, called as the first of them is, that runs them all in one compiled graph (a pp
    stage's layers: the model's forward around them, with the stage's hooks, stays eager). Its caller checks it
    against the layers run one by one (`differs`) before it serves.

    Example::

        joined = compile_layers(model.model.layers[4:8])
        hidden = joined(hidden, attention_mask=NO_MASK, position_embeddings=(cos, sin), paged=batch)
    """
    return _CompiledLayers(layers)


class _CompiledLayers(torch.nn.Module):
    def __init__(self, layers: Sequence[torch.nn.Module]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self._attention = {module.layer_idx: module for module in self.layers.modules() if type(module) in _INNER}
        self._compiled = torch.compile(self._run, dynamic=True)

    def _run(self, hidden_states, *args, **kwargs):
        out = hidden_states
        for layer in self.layers:  # every layer called as the model calls each (the same arguments)
            out = layer(hidden_states, *args, **kwargs)
            hidden_states = out[0] if isinstance(out, (tuple, list)) else out
        return out

    def forward(self, hidden_states, *args, paged: Optional[PagedBatch] = None, **kwargs):
        with compiled_step(paged, self._attention):  # the graph's attention op reads the batch from here
            return self._compiled(hidden_states, *args, **kwargs)


def differs(eager: torch.Tensor, got: torch.Tensor) -> Optional[str]:
    """How `got` differs from `eager` beyond TOLERANCE of the largest value, or None."""
    difference = float((got.float() - eager.float()).abs().max())
    scale = max(1.0, float(eager.abs().max()))
    if difference <= TOLERANCE * scale:
        return None
    return f"differ from the eager step's by {difference:.3g} (largest value {scale:.3g})"


def say_compiled(breaks_before: float, progress: Optional[Callable[[str], None]]) -> None:
    """Log the graph breaks since `breaks_before` (graph_breaks()), then that the step runs compiled."""
    breaks = torch._dynamo.utils.counters["graph_break"]
    if sum(breaks.values()) > breaks_before:
        reasons = "; ".join(f"{reason[:120]} ({count}x)" for reason, count in list(breaks.items())[:3])
        logger.warning("handler.compile_step: the compiled step breaks its graph (%s); it runs compiled in pieces",
                       reasons)
    (progress or logger.info)("handler.compile_step: the step runs compiled")


def graph_breaks() -> float:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def step_kwargs(device: torch.device, keep: Callable[[PagedBatch], dict]) -> Callable[[torch.Tensor, PagedBatch],
                                                                                       Dict[str, Any]]:
    """The model's keyword arguments for a paged step of `ids` over `batch` (without the batch itself)."""
    def inputs(ids: torch.Tensor, batch: PagedBatch) -> Dict[str, Any]:
        return dict(input_ids=ids.view(1, -1).to(device), position_ids=batch.position_ids.to(device),
                    attention_mask=NO_MASK.to(device), use_cache=False, **keep(batch))
    return inputs


def say_eager(progress: Optional[Callable[[str], None]], why: str) -> None:
    message = f"handler.compile_step: the step runs eagerly ({why})"
    logger.warning(message)
    if progress:
        progress(message)
    return None
