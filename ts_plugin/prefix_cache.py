"""Automatic prefix caching: the KV of full blocks of prompt tokens is kept after a prompt's prefill, and a later
prompt that starts with the same blocks is prefilled from its first new token on, as vLLM's prefix caching does.

Two halves, so that every rank keeps only its own part of the KV while one place decides:
- `PrefixIndex`, on the scheduler's side: which blocks are stored, keyed by (the block before, its tokens), so a
  block matches only after the same whole prefix; least recently used blocks go first once the budget
  (`handler.prefix_cache_tokens`) is full. Its decisions depend on the prompts alone, so every rank that runs the
  loop (tp, pptp) takes the same ones, and in pp rank 0 tells the stages.
- `PrefixStore`, on the engine's side: the blocks' keys and values of this rank's layers and heads, copied out of a
  batch's cache after its prefill and copied into a new one-row cache on a hit (`StepModel.save_prefix`,
  `cache_from_prefix`, `drop_prefix`).

Blocks are copies, not pages of one pool: the running batch's cache is the left-padded DynamicCache that every
engine keeps (see ts_plugin.continuous), which cannot point into shared pages. So a hit costs a copy of the prefix
(memory bandwidth) instead of its prefill (compute), and stored blocks cost memory beside the running batch's.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from typing import Any, Dict, List, Sequence, Tuple

import torch

#: tokens per block, as vLLM's default on GPU
BLOCK_SIZE = 16
_ROOT = -1  # the parent of a prompt's first block


class PrefixIndex:
    """The stored blocks of prompt tokens, by prefix. One index serves every group of rows of a worker; `lock` keeps
    a look-up or an insertion and the engine calls that go with it together.

    Example::

        index = PrefixIndex(capacity_tokens=4096)
        blocks = index.match(prompt_ids)  # stored blocks that begin the prompt: len(blocks) * 16 tokens to skip
        new, evicted = index.insert(prompt_ids)  # after its prefill: the blocks to save, the ones to drop
    """

    def __init__(self, capacity_tokens: int, block_size: int = BLOCK_SIZE):
        if capacity_tokens < block_size:
            raise ValueError(f"a prefix cache of {capacity_tokens} tokens holds no block of {block_size}")
        self.block_size = block_size
        self.capacity = capacity_tokens // block_size  # in blocks
        self.lock = threading.RLock()
        self._ids = itertools.count()
        # (parent block id, the block's tokens) -> block id, least recently used first
        self._blocks: "OrderedDict[Tuple[int, Tuple[int, ...]], int]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, prompt: Sequence[int], blocks: int) -> Tuple[List[Tuple[int, Tuple[int, ...]]], List[int]]:
        """The keys and ids of the stored blocks that begin `prompt`, up to `blocks` of them."""
        keys, ids, parent = [], [], _ROOT
        for start in range(0, blocks * self.block_size, self.block_size):
            key = (parent, tuple(prompt[start:start + self.block_size]))
            block = self._blocks.get(key)
            if block is None:
                break
            keys.append(key)
            ids.append(block)
            parent = block
        return keys, ids

    def _touch(self, keys: List[Tuple[int, Tuple[int, ...]]]) -> None:
        # the first block ends most recent: a prefix outlives the blocks that extend it
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def match(self, prompt: Sequence[int]) -> List[int]:
        """The ids of the stored blocks that begin `prompt`, leaving at least its last token to compute (its logits
        give the first new token)."""
        keys, ids = self._chain(prompt, (len(prompt) - 1) // self.block_size)
        self._touch(keys)
        return ids

    def insert(self, prompt: Sequence[int]) -> Tuple[List[Tuple[int, int]], List[int]]:
        """Register every full block of a prefilled `prompt`. Returns the new blocks as (block id, index of the
        block in the prompt), for the engine to save, and the ids of the blocks evicted to make room."""
        full = len(prompt) // self.block_size
        chain, ids = self._chain(prompt, full)
        new: List[Tuple[int, int]] = []
        evicted: List[int] = []
        parent = ids[-1] if ids else _ROOT
        for index in range(len(ids), full):
            if len(self._blocks) >= self.capacity:
                victim = next((key for key in self._blocks if key not in chain), None)
                if victim is None:  # the budget holds less than this prompt: its first blocks are kept
                    break
                evicted.append(self._blocks.pop(victim))
            key = (parent, tuple(prompt[index * self.block_size:(index + 1) * self.block_size]))
            parent = self._blocks[key] = next(self._ids)
            chain.append(key)
            new.append((parent, index))
        self._touch(chain)
        return new, evicted


def distinct_layers(cache: Any) -> List[Any]:
    """The layers of a transformers DynamicCache, each once (pp stages alias other stages' slots to their own)."""
    seen, layers = set(), []
    for layer in getattr(cache, "layers", None) or []:
        if id(layer) not in seen:
            seen.add(id(layer))
            layers.append(layer)
    return layers


def holds_tensors(layer: Any) -> bool:
    return getattr(layer, "keys", None) is not None and layer.keys.numel() > 0


class PrefixStore:
    """This rank's copies of the stored blocks: per block, the keys and values of each of its layers that hold
    any (a pp stage's layers, a tp rank's heads)."""

    def __init__(self):
        self.blocks: Dict[int, List[Tuple[int, torch.Tensor, torch.Tensor]]] = {}

    def save(self, cache: Any, row: int, blocks: Sequence[Tuple[int, int]], block_size: int) -> None:
        """Copy blocks of `row` of `cache`: (block id, first position in the cache) each."""
        layers = [(index, layer) for index, layer in enumerate(distinct_layers(cache)) if holds_tensors(layer)]
        for block_id, start in blocks:
            end = start + block_size
            self.blocks[block_id] = [(index, layer.keys[row:row + 1, :, start:end].clone(),
                                      layer.values[row:row + 1, :, start:end].clone()) for index, layer in layers]

    def fill(self, cache: Any, blocks: Sequence[int]) -> Any:
        """Write the stored `blocks`, in order, into the empty one-row `cache`; returns it."""
        layers = distinct_layers(cache)
        parts = [self.blocks[block_id] for block_id in blocks]
        for per_layer in zip(*parts):
            index = per_layer[0][0]
            layers[index].update(torch.cat([keys for _, keys, _ in per_layer], dim=-2),
                                 torch.cat([values for _, _, values in per_layer], dim=-2))
        return cache

    def drop(self, blocks: Sequence[int]) -> None:
        for block_id in blocks:
            self.blocks.pop(block_id, None)
