"""The scheduler's side of the paged KV cache: which blocks are free, which rows hold which, and the prefix cache.

Every rank keeps its own pool of keys and values (ts_plugin.engines._paged.KVPool: its layers, its kv heads); the
block ids come from here, from the one loop that decides (rank 0's in pp, and the same calls on every tp/pptp
rank), so all ranks write a row to the same blocks.

Automatic prefix caching, as vLLM's: a block full of tokens is registered under (the block before it, its tokens),
so it matches only after the same whole prefix. A row that starts with registered blocks takes them (their
reference count goes up) instead of computing them; a block whose last row left stays registered and evictable,
least recently used first, until a new block is needed. `cached_blocks` bounds how many registered blocks are kept
(handler.prefix_cache_tokens). Block contents are named by a serial number, not the block id, so a key whose
parent block was evicted and reused can never match again.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

#: tokens per block, as vLLM's default on GPU
BLOCK_SIZE = 16
_ROOT = -1  # the parent of a prompt's first block


class KVBlocks:
    """`blocks` blocks of `block_size` tokens, handed to rows; with `cached_blocks` > 0, full blocks are kept for
    prefix hits.

    Example::

        kv = KVBlocks(blocks=256, cached_blocks=512)
        table = kv.match(prompt_ids)  # blocks a prompt can start from: len(table) * 16 tokens not to compute
        table += kv.allocate(2)  # None where there are not 2 blocks to give
        kv.register(table, prompt_ids)  # its full blocks, for later prompts
        kv.free(table)  # the row left
    """

    def __init__(self, blocks: int, block_size: int = BLOCK_SIZE, cached_blocks: int = 0):
        if blocks < 1:
            raise ValueError(f"a KV cache of {blocks} blocks holds nothing")
        self.blocks = blocks
        self.block_size = block_size
        self.cached_limit = cached_blocks
        self._free: List[int] = list(range(blocks - 1, -1, -1))  # popped from the end: lowest ids first
        self._refs: Dict[int, int] = {}
        self._serials = itertools.count()
        self._keys: "OrderedDict[Tuple[int, Tuple[int, ...]], int]" = OrderedDict()  # key -> block
        self._key_of: Dict[int, Tuple[int, Tuple[int, ...]]] = {}  # block -> its key
        self._serial_of: Dict[int, int] = {}
        self._evictable: "OrderedDict[int, None]" = OrderedDict()  # registered blocks no row holds, LRU first

    @property
    def available(self) -> int:
        """Blocks a row could get now: free ones and registered ones that no row holds."""
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        """Blocks held by rows."""
        return len(self._refs)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def match(self, ids: Sequence[int]) -> List[int]:
        """The registered blocks that begin `ids`, leaving at least its last token to compute (its logits give the
        next token); the caller's row now holds them."""
        table: List[int] = []
        parent = _ROOT
        for start in range(0, (len(ids) - 1) // self.block_size * self.block_size, self.block_size):
            block = self._keys.get((parent, tuple(ids[start:start + self.block_size])))
            if block is None:
                break
            table.append(block)
            parent = self._serial_of[block]
        for block in table:
            self._hold(block)
        return table

    def allocate(self, count: int) -> Optional[List[int]]:
        """`count` blocks for a row, evicting registered blocks that no row holds where the free ones run out; None
        (and nothing taken) where there are not that many."""
        if count > self.available:
            return None
        taken = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._unregister(block)
            self._refs[block] = 1
            taken.append(block)
        return taken

    def free(self, table: Sequence[int]) -> None:
        """A row let go of its blocks: registered ones stay for prefix hits, the others are free again."""
        for block in reversed(table):  # a prefix's first block outlives the blocks that extend it
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            del self._refs[block]
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)
        self._trim()

    def register(self, table: Sequence[int], ids: Sequence[int]) -> None:
        """Register the full blocks of a row whose first len(ids) tokens are in its blocks `table`."""
        if not self.cached_limit:
            return
        parent = _ROOT
        for index in range(len(ids) // self.block_size):
            block = table[index]
            key = (parent, tuple(ids[index * self.block_size:(index + 1) * self.block_size]))
            known = self._keys.get(key)
            if known is None:
                if block in self._key_of:  # not these tokens: nothing past here can be registered
                    break
                self._keys[key] = known = block
                self._key_of[block] = key
                self._serial_of[block] = next(self._serials)
            else:
                self._keys.move_to_end(key)
            # where the same tokens are registered in another block, later blocks chain from that one
            parent = self._serial_of[known]
        self._trim()

    def _hold(self, block: int) -> None:
        if block in self._refs:
            self._refs[block] += 1
        else:
            self._evictable.pop(block, None)
            self._refs[block] = 1

    def _unregister(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._keys[key]
        del self._serial_of[block]

    def _trim(self) -> None:
        """Keep at most cached_limit registered blocks: the least recently used that no row holds go first."""
        while len(self._key_of) > self.cached_limit and self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._unregister(block)
            self._free.append(block)
