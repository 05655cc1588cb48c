"""The paged KV cache that every engine's forward runs over: a flat batch of new tokens, each row's keys and values
in fixed-size blocks of one preallocated pool per layer.

A step is one forward of every row's new tokens side by side (`[1, tokens]`): decode rows one token each, prefill
rows a chunk of their prompt. `PagedBatch` says, for that step, which pool slot each new token's keys and values go
to and which slots each row reads (its block table up to its length). The model runs its own forward with its
attention implementation switched to `paged_attention` (transformers' AttentionInterface), which writes the step's
keys and values into this rank's pool and attends each row over its own slots: decode rows together in one call of
the model's own attention function (sdpa or eager), padded to the longest, each prefill row in one of its own. So
rows are never padded to each other in the cache, a row joins or leaves by its block table alone, and rows that
begin with the same blocks (a prefix-cache hit) read the same slots.

`KVPool` allocates a layer's blocks at its first write, with the heads and device the layer gives: a tp rank holds
its share of the kv heads, a pp stage its own layers, an Accelerate layer its device. The blocks themselves (which
row owns which, prefix sharing, the budget) are the scheduler's (ts_plugin.kv_blocks); the engine only follows the
block tables it is given.

Taken from transformers' continuous batching (`PagedAttentionCache`, the `paged|sdpa` path): the idea of running
the model's own forward over a flat batch with a registered attention function and block tables. Not taken: its
cache and manager, which size the pool for the whole model's heads in one process and run a scheduler of their
own; here the pool is per rank and the block tables come from ts_plugin's scheduler, so tp ranks and pp stages
follow one decision.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import _cpu_kernels

logger = logging.getLogger(__name__)

#: the name of the attention implementation that engines switch their models to
ATTENTION = "ts_plugin_paged"
#: passed as the attention mask with a PagedBatch: a 4D mask is taken as it is, so the model makes none (each row's
#: mask is the batch's)
NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)


class KVPool:
    """This rank's keys and values: per layer (by the attention module's `layer_idx`), two tensors of
    `[kv heads, slots, head dim]`. A layer's tensors are made at its first write with the heads, dtype and device the
    layer gives, and grow (doubling, zero-filled: padded reads must not meet NaN) as higher blocks are used, so memory
    follows what the scheduler hands out rather than its budget.

    Example::

        pool = KVPool(block_size=16)
    """

    def __init__(self, block_size: int):
        if block_size < 1:
            raise ValueError(f"a KV block holds at least one token (got {block_size})")
        self.block_size = block_size
        self.blocks: Optional[int] = None  # the most it may grow to: the step loop's KV blocks
        self.layers: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              batch: "PagedBatch") -> Tuple[torch.Tensor, torch.Tensor]:
        """Store a step's `keys` and `values` (`[kv heads, tokens, head dim]`) at its slots; return the layer's pool."""
        pool = self.layers.get(layer)
        if pool is None or pool[0].shape[1] < batch.slots_needed:
            pool = self._grow(layer, keys, values, batch)
        slots = batch.slots.to(keys.device)
        pool[0].index_copy_(1, slots, keys)
        pool[1].index_copy_(1, slots, values)
        return pool

    def reserve(self, batch: "PagedBatch") -> None:
        """Grow the layers made so far to hold `batch`'s slots, as their writes would."""
        for layer, pool in list(self.layers.items()):
            if pool[0].shape[1] < batch.slots_needed:
                self._grow(layer, *pool, batch)

    def _grow(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              batch: "PagedBatch") -> Tuple[torch.Tensor, torch.Tensor]:
        pool = self.layers.get(layer)
        grown = max(batch.slots_needed, 2 * pool[0].shape[1] if pool else 0)
        if batch.blocks:
            grown = min(grown, batch.blocks * self.block_size)
        grown = -(-grown // self.block_size) * self.block_size
        made = tuple(part.new_zeros((part.shape[0], grown, part.shape[-1])) for part in (keys, values))
        if pool is not None:
            for new, old in zip(made, pool):
                new[:, :old.shape[1]] = old
        self.layers[layer] = made
        return made

    def nbytes(self) -> int:
        return sum(part.nbytes for pool in self.layers.values() for part in pool)


@dataclass
class PagedRow:
    """One row of a step: its block table, how many of its tokens are in the cache once the step has run
    (`length`), and how many of those the step computes (`new`, its last ones)."""

    blocks: Sequence[int]
    length: int
    new: int


@dataclass
class _Group:
    """Rows attended in one call: `rows` rows of `queries` new tokens each (decode rows: one)."""

    tokens: torch.Tensor  # [rows x queries]: where the rows' new tokens are in the step
    tables: torch.Tensor  # [rows, most blocks]: the rows' block tables (padding: block 0)
    positions: torch.Tensor  # [rows, queries]: each new token's position in its row
    lengths: torch.Tensor  # [rows]
    block_size: int
    contiguous_tokens: bool  # tokens are first..first + rows x queries, in order
    _reads: Optional[torch.Tensor] = None
    _masks: Dict[Any, torch.Tensor] = field(default_factory=dict)

    @property
    def reads(self) -> torch.Tensor:
        """`[rows, longest]`: the slots each row reads (padding repeats slot 0)."""
        if self._reads is None:
            longest = int(self.lengths.max())
            slots = self.tables.unsqueeze(-1) * self.block_size + torch.arange(self.block_size)
            self._reads = slots.view(len(self.tables), -1)[:, :longest] * (
                torch.arange(longest) < self.lengths.view(-1, 1))
        return self._reads

    def mask(self, window: Optional[int], dtype: Optional[torch.dtype]) -> torch.Tensor:
        """`[rows, 1, queries, longest]`: True (or 0.0 for an additive mask of `dtype`) where a query attends."""
        key = (window, dtype)
        if key not in self._masks:
            read = torch.arange(self.reads.shape[1]).view(1, 1, -1)
            at = self.positions.unsqueeze(-1)
            allowed = (read <= at) & (read < self.lengths.view(-1, 1, 1))
            if window:
                allowed &= read > at - window
            allowed = allowed.unsqueeze(1)
            self._masks[key] = allowed if dtype is None else torch.zeros(allowed.shape, dtype=dtype).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return self._masks[key]


class PagedBatch:
    """One step's flat batch over a KV pool: where each new token's keys and values go and what each row reads.
    Every rank that runs the step makes it from the same rows (a pp stage from the ints it received: `from_ints`).

    Example::

        batch = PagedBatch(pool, [PagedRow([0, 1], 20, 20), PagedRow([2], 7, 1)])
        logits = model(input_ids=ids, position_ids=batch.position_ids, attention_mask=NO_MASK, use_cache=False,
                       paged=batch, logits_to_keep=batch.last_tokens).logits
    """

    def __init__(self, pool: KVPool, rows: Sequence[PagedRow], blocks: Optional[int] = None):
        self.pool = pool
        self.rows = list(rows)
        self.blocks = blocks or pool.blocks  # the most blocks the pool may hold
        size = pool.block_size
        positions, slots, last = [], [], []
        for row in self.rows:
            if row.new < 1 or row.new > row.length or len(row.blocks) * size < row.length:
                raise ValueError(f"a row of {row.length} tokens ({row.new} new) does not fit {len(row.blocks)} "
                                 f"blocks of {size}")
            start = row.length - row.new
            positions += range(start, row.length)
            slots += [row.blocks[p // size] * size + p % size for p in range(start, row.length)]
            last.append(len(positions) - 1)
        self.position_ids = torch.tensor([positions], dtype=torch.long)
        self.slots = torch.tensor(slots, dtype=torch.long)
        self.slots_needed = (max(max(row.blocks[:-(-row.length // size)]) for row in self.rows) + 1) * size
        self.last_tokens = torch.tensor(last, dtype=torch.long)
        self.groups = self._groups()

    def to_ints(self) -> torch.Tensor:
        """The rows as one int tensor, for a pp stage to rebuild the batch (`from_ints`)."""
        ints = [len(self.rows), self.blocks or 0]
        for row in self.rows:
            ints += [row.length, row.new, len(row.blocks), *row.blocks]
        return torch.tensor(ints, dtype=torch.long)

    @classmethod
    def from_ints(cls, pool: KVPool, ints: torch.Tensor) -> "PagedBatch":
        values = ints.tolist()
        rows, at = [], 2
        for _ in range(values[0]):
            length, new, count = values[at:at + 3]
            rows.append(PagedRow(values[at + 3:at + 3 + count], length, new))
            at += 3 + count
        return cls(pool, rows, values[1] or None)

    @property
    def tokens(self) -> int:
        return self.slots.numel()

    def _groups(self) -> List[_Group]:
        """The decode rows together (first), then each prefill row alone."""
        firsts = [0]
        for row in self.rows:
            firsts.append(firsts[-1] + row.new)
        decoding = [i for i, row in enumerate(self.rows) if row.new == 1]
        groups = [self._group(decoding, firsts)] if decoding else []
        return groups + [self._group([i], firsts) for i, row in enumerate(self.rows) if row.new > 1]

    def _group(self, indexes: List[int], firsts: List[int]) -> _Group:
        rows = [self.rows[i] for i in indexes]
        size = self.pool.block_size
        most = max(-(-row.length // size) for row in rows)
        tables = torch.zeros((len(rows), most), dtype=torch.long)
        for at, row in enumerate(rows):
            used = list(row.blocks[:-(-row.length // size)])
            tables[at, :len(used)] = torch.tensor(used, dtype=torch.long)
        queries = rows[0].new
        tokens = [firsts[i] + q for i in indexes for q in range(queries)]
        positions = torch.tensor([[row.length - queries + q for q in range(queries)] for row in rows])
        return _Group(torch.tensor(tokens, dtype=torch.long), tables, positions,
                      torch.tensor([row.length for row in rows]), size,
                      tokens == list(range(tokens[0], tokens[0] + len(tokens))))


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                    **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature over a PagedBatch (the `paged` keyword argument, or the compiled
    step's: `compiled_step`): query, key and value are `[1, heads, step tokens, head dim]`; returns `[1, step
    tokens, heads, head dim]`. In a graph being compiled it is one opaque op (`ts_plugin::paged_attention`)."""
    if torch.compiler.is_compiling():  # the batch is the compiled step's, read when the op runs
        if any(kwargs.get(name) is not None for name in _SHAPING_KWARGS):
            return _attend_outside_graph(module, query, key, value, scaling, kwargs), None
        # on CPU, the kernels' op: a step of decode rows attends in C++ (compiled_step), others through _attend
        op = (torch.ops.ts_plugin.paged_attention_cpu if query.device.type == "cpu" and _cpu_kernels.built()
              else torch.ops.ts_plugin.paged_attention)
        return op(query, key, value, module.layer_idx, float(scaling or 0.0),
                  int(kwargs.get("sliding_window") or 0)), None
    batch: Optional[PagedBatch] = kwargs.pop("paged", None) or _STEP.batch
    if batch is None:  # a forward of the model's own (generate): its own attention, over its own cache and mask
        inner, _ = _INNER[type(module)]
        return inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return _attend(module, query, key, value, batch, scaling, kwargs), None


def _attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: PagedBatch,
            scaling: Optional[float], kwargs: Dict[str, Any]) -> torch.Tensor:
    inner, additive = _INNER[type(module)]
    window = kwargs.pop("sliding_window", None) or 0
    kwargs.pop("is_causal", None)
    keys, values = batch.pool.write(module.layer_idx, key[0], value[0], batch)
    heads, head_dim = query.shape[1], query.shape[-1]
    out = query.new_empty((query.shape[2], heads, head_dim))
    for group in batch.groups:
        rows, queries = group.positions.shape
        first, count = int(group.tokens[0]), rows * queries
        if group.contiguous_tokens:
            q = query[0, :, first:first + count]
        else:
            q = query[0].index_select(1, group.tokens.to(query.device))
        if queries == 1 and _kernel_fits(module, q, keys, kwargs):
            attended = _cpu_kernels.KERNELS[0].paged_decode(q.transpose(0, 1), keys, values, group.tables,
                                                            group.lengths, group.block_size,
                                                            scaling or head_dim ** -0.5, window)
        else:
            q = q.view(heads, rows, queries, head_dim).transpose(0, 1)
            reads = group.reads.to(keys.device).view(-1)
            k = keys.index_select(1, reads).view(keys.shape[0], rows, -1, head_dim).transpose(0, 1)
            v = values.index_select(1, reads).view(values.shape[0], rows, -1, head_dim).transpose(0, 1)
            mask = group.mask(window, query.dtype if additive else None).to(query.device)
            attended, _ = inner(module, q, k, v, mask, scaling=scaling, dropout=0.0, is_causal=False, **kwargs)
        attended = attended.reshape(count, heads, head_dim)
        if group.contiguous_tokens:
            out[first:first + count] = attended
        else:
            out.index_copy_(0, group.tokens.to(out.device), attended)
    return out.unsqueeze(0)


class _Step(threading.local):
    """The PagedBatch of the compiled step this thread runs, and its attention modules by layer_idx."""

    batch: Optional[PagedBatch] = None
    modules: Dict[int, torch.nn.Module] = {}


_STEP = _Step()
#: attention keyword arguments that change the result and that the compiled step's op does not take: where a
#: model sets one, its attention runs outside the graph (the load's warm-up check compares the logits anyway)
_SHAPING_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "head_mask", "dropout_rng")


@contextlib.contextmanager
def compiled_step(batch: PagedBatch, modules: Dict[int, torch.nn.Module]) -> Iterator[None]:
    """Within the block, attention in a compiled forward of this thread runs over `batch`, `modules[layer_idx]`
    being the attention module of each layer (the graph's op cannot take either). Where every row decodes and the
    decode kernel fits every layer, the kernels' op attends in C++ over the pool's tensors, given here."""
    _STEP.batch, _STEP.modules = batch, modules
    kernels = _cpu_kernels.built()
    decoding = len(batch.groups) == 1 and batch.groups[0].positions.shape[1] == 1
    in_cpp = (kernels is not None and bool(modules) and decoding
              and all(getattr(module, "sinks", None) is None for module in modules.values()))
    if in_cpp:
        group, pool = batch.groups[0], batch.pool
        pool.reserve(batch)
        layers = [pool.layers.get(layer, (torch.Tensor(), torch.Tensor())) for layer in range(max(modules) + 1)]
        kernels.set_decode_step([keys for keys, _ in layers], [values for _, values in layers], batch.slots,
                                group.tables, group.lengths, pool.block_size)
    try:
        yield
    finally:
        _STEP.batch, _STEP.modules = None, {}
        if in_cpp:
            kernels.clear_decode_step()


def _attend_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float,
                 window: int) -> torch.Tensor:
    """The compiled step's attention of `layer` over the thread's PagedBatch (compiled_step)."""
    return _attend(_STEP.modules[layer], query, key, value, _STEP.batch, scaling or None,
                   {"sliding_window": window})


_paged_attention_op = torch.library.custom_op("ts_plugin::paged_attention", _attend_step, mutates_args=())
_paged_attention_op.register_fake(_cpu_kernels.attention_shape)  # as the kernels' op


@torch.compiler.disable
def _attend_outside_graph(module, query, key, value, scaling, kwargs):
    return _attend(module, query, key, value, _STEP.batch, scaling, dict(kwargs))


#: the model's own attention function per attention module class, and whether its mask is additive (eager)
_INNER: Dict[type, Tuple[Callable, bool]] = {}


def _kernel_fits(module: torch.nn.Module, q: torch.Tensor, keys: torch.Tensor, kwargs: Dict[str, Any]) -> bool:
    """Whether the decode kernel computes this layer's attention: float32 on CPU, plain scaled dot-product
    (no softcap, sinks or position bias), whole groups of query heads per kv head."""
    return bool(_cpu_kernels.built() is not None and q.device.type == "cpu" and q.dtype == torch.float32
                and keys.dtype == torch.float32 and q.shape[0] % keys.shape[0] == 0
                and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
                and getattr(module, "sinks", None) is None)


def use_paged_attention(model: torch.nn.Module) -> None:
    """Switch `model` to paged_attention, keeping its own implementation (sdpa, or eager: the model file's
    `eager_attention_forward`) for the rows' attention, and load the decode kernel on CPU
    (engines/_cpu_kernels.py)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    own = model.config._attn_implementation or "eager"
    AttentionInterface.register(ATTENTION, paged_attention)
    if own != ATTENTION:  # the model's own forwards (without a PagedBatch) keep their masks
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager" if own == "eager" else "sdpa"])
    for module in model.modules():
        if hasattr(module, "layer_idx") and type(module) not in _INNER and own != ATTENTION:
            eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if own == "eager" and eager is not None:
                _INNER[type(module)] = (eager, True)
            else:
                _INNER[type(module)] = (ALL_ATTENTION_FUNCTIONS.get(own, ALL_ATTENTION_FUNCTIONS["sdpa"]),
                                        own not in ALL_ATTENTION_FUNCTIONS or own != "sdpa")
    for config in [model.config] + [getattr(model.config, name, None) for name in
                                     (getattr(model.config, "sub_configs", None) or {})]:
        if config is not None:
            config._attn_implementation = ATTENTION
    if any(parameter.device.type == "cpu" for parameter in model.parameters()):
        _cpu_kernels.load_cpu_kernels()
        if _cpu_kernels.built() is not None:
            _cpu_kernels.built().set_attention_fallback(_attend_step)
