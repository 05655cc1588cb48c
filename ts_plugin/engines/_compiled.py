"""`handler.compile_step`: a step's forward compiled by `torch.compile` (inductor) into one graph, so the norms,
rotary embeddings, residual adds and activations between the linears run as a few fused kernels instead of a few
hundred small ops each dispatched from Python.

What dynamo cannot trace is one opaque op in the graph (torch.library custom ops): the paged attention
(`ts_plugin::paged_attention_cpu` on CPU, in C++ where every row decodes, else `ts_plugin::paged_attention`; both read
the step's PagedBatch from `compiled_step`), small_linear (`ts_plugin::small_linear`) and tp's all-reduce
(`ts_plugin::inference_all_reduce_`). So it neither breaks at the attention nor at tp's collectives.

The step's sizes (tokens, rows) are marked unbacked, so one graph serves every step, one token and one row
included. It compiles at load, on a scratch KV pool: 30-140 s on a 2-CPU host, which startupTimeout must cover
(rule TSP225). The warm-up steps (one token, one row, several of each) compare their logits with the eager
forward's; a compile error or a difference makes the model run eagerly, said once in the log, as graph breaks are.
Where no warm-up step after the first compiled anything, the steps skip dynamo's guards (torch.compiler.set_stance's
skip_guard_eval_unsafe): every step shape runs that graph, and what the guards check (the model's modules and
parameters) does not change while a worker serves.
Measured: docs/benchmarks.md, "The step compiled"; untried on GPU (no device was lent).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import torch

from ..kv_blocks import BLOCK_SIZE
from ._paged import _INNER, NO_MASK, KVPool, PagedBatch, PagedRow, compiled_step

logger = logging.getLogger(__name__)

#: warm-up steps (block ids, length, new tokens per row): prefills, decodes and a prefill chunk, one row and several
_WARM_UP: List[List[PagedRow]] = [
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
                return _eager(progress, f"two attention modules share layer_idx {module.layer_idx}")
            modules[module.layer_idx] = module
    compiled = torch.compile(model, dynamic=True)

    def forward(batch: PagedBatch, inputs: Dict[str, Any]) -> Any:
        for name, dim in _STEP_DIMS.items():  # any size, 1 included: one graph for every step
            if name in inputs:
                tensor = inputs[name]
                torch._dynamo.decorators.mark_unbacked(tensor, dim)
                if tensor._base is not None:  # a view's base is guarded on too (input_ids: [tokens] viewed)
                    torch._dynamo.decorators.mark_unbacked(tensor._base, tensor._base.dim() - 1)
        with compiled_step(batch, modules), torch.compiler.set_stance(skip_guard_eval_unsafe=settled):
            return compiled(**inputs)

    settled = False  # the warm-up compiled every graph the steps need
    breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
    graphs = torch._dynamo.utils.counters["stats"]
    vocab = model.config.get_text_config().vocab_size
    eager_pool, compiled_pool = KVPool(BLOCK_SIZE), KVPool(BLOCK_SIZE)
    try:
        for index, rows in enumerate(_WARM_UP):  # inputs made outside inference mode, as the step loop makes them
            if index == 1:
                graphs_after_first = graphs["unique_graphs"]
            ids = torch.arange(1, 1 + sum(row.new for row in rows)) % vocab
            eager_batch, batch = PagedBatch(eager_pool, rows), PagedBatch(compiled_pool, rows)
            eager_inputs, inputs = step_inputs(ids, eager_batch), step_inputs(ids, batch)
            with torch.inference_mode():
                eager = model(**eager_inputs, paged=eager_batch)
                got = forward(batch, inputs)
                difference = float((got.logits - eager.logits).abs().max())
                scale = max(1.0, float(eager.logits.abs().max()))
                if not difference <= TOLERANCE * scale:
                    return _eager(progress, f"its logits differ from the eager step's by {difference:.3g} "
                                            f"(largest logit {scale:.3g})")
    except Exception as error:  # noqa: BLE001 - any compile failure: the eager step serves, loudly
        return _eager(progress, f"{type(error).__name__}: {str(error)[:300]}")
    breaks = torch._dynamo.utils.counters["graph_break"]
    if sum(breaks.values()) > breaks_before:
        reasons = "; ".join(f"{reason[:120]} ({count}x)" for reason, count in list(breaks.items())[:3])
        logger.warning("handler.compile_step: the compiled step breaks its graph (%s); it runs compiled in pieces",
                       reasons)
    # No warm-up step after the first compiled anything more: every step shape runs the same graphs, so their
    # guards (some 4,500 checks of the model's modules and parameters, 1.7 ms of a 25 ms SmolLM2 step) are skipped
    settled = graphs["unique_graphs"] == graphs_after_first
    (progress or logger.info)("handler.compile_step: the step runs compiled"
                              + ("" if settled else " (its guards checked at every step: the warm-up recompiled)"))
    return forward


def step_kwargs(device: torch.device, keep: Callable[[PagedBatch], dict]) -> Callable[[torch.Tensor, PagedBatch],
                                                                                       Dict[str, Any]]:
    """The model's keyword arguments for a paged step of `ids` over `batch` (without the batch itself)."""
    def inputs(ids: torch.Tensor, batch: PagedBatch) -> Dict[str, Any]:
        return dict(input_ids=ids.view(1, -1).to(device), position_ids=batch.position_ids.to(device),
                    attention_mask=NO_MASK.to(device), use_cache=False, **keep(batch))
    return inputs


def _eager(progress: Optional[Callable[[str], None]], why: str) -> None:
    message = f"handler.compile_step: the step runs eagerly ({why})"
    logger.warning(message)
    if progress:
        progress(message)
    return None
