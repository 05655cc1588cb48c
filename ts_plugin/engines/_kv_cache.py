"""The batch's KV cache: transformers' DynamicCache whose full-attention layers append in place.

transformers' `DynamicLayer` grows by `torch.cat`, which copies every row's keys and values at every step, a cost
that grows with the context (measured by `python -m bench.kv_append`: docs/benchmarks.md). `SpareRoomLayer` keeps
them in a buffer with room for `SPARE` more positions and hands the model views of it, so a step writes only its
new positions; the buffer is copied once per `SPARE` decode steps instead.

Continuous batching's `merge` writes the joined rows straight into a new room (`new_room`): one copy instead of
padding, concatenating and moving. Whatever else edits a layer (`select_rows`, `crop`) assigns plain tensors to
`keys` and `values`: the next update sees that they are not views of the room and moves them into a new one.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: positions of room a layer keeps past its length: one copy of the cache per SPARE decode steps
SPARE = 64


class SpareRoomLayer(DynamicLayer):
    """A full-attention layer whose `keys` and `values` are views of a larger buffer (`[batch, heads, positions,
    head dim]`, positions growing in place)."""

    _keys_room: Optional[torch.Tensor] = None
    _values_room: Optional[torch.Tensor] = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._fits(key_states, end):
            kept = (self.keys, self.values)
            moved = new_room(self, key_states.shape[0], end, like=(key_states, value_states))
            if length:
                for target, source in zip(moved, kept):
                    target[..., :length, :] = source
        self._keys_room[..., length:end, :] = key_states
        self._values_room[..., length:end, :] = value_states
        self.keys, self.values = self._keys_room[..., :end, :], self._values_room[..., :end, :]
        return self.keys, self.values

    def _fits(self, key_states: torch.Tensor, end: int) -> bool:
        """Whether `keys` is still the start of the room (nothing assigned another tensor) with room up to `end`."""
        room = self._keys_room
        if room is None or end > room.shape[-2] or room.shape[:-2] != key_states.shape[:-2]:
            return False
        if self.get_seq_length() == 0:
            return True
        return (self.keys.data_ptr() == room.data_ptr() and self.values.data_ptr() == self._values_room.data_ptr()
                and self.keys.stride() == room.stride() and self.keys.shape[:-2] == room.shape[:-2])

    def reset(self) -> None:
        self._keys_room = self._values_room = None
        super().reset()


def new_room(layer: DynamicLayer, rows: int, positions: int,
             like: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Give `layer` new, unfilled keys and values of `rows` x `positions` (with spare room behind them where it
    appends in place) and return them, for the caller to fill in one copy. Heads, head dim, dtype and device are
    those of `like` (keys, values), by default the layer's own."""
    keys, values = like or (layer.keys, layer.values)
    spare = SPARE if isinstance(layer, SpareRoomLayer) else 0
    keys_room = keys.new_empty((rows, keys.shape[1], positions + spare, keys.shape[-1]))
    values_room = values.new_empty((rows, values.shape[1], positions + spare, values.shape[-1]))
    if spare:
        layer._keys_room, layer._values_room = keys_room, values_room
    layer.keys, layer.values = keys_room[..., :positions, :], values_room[..., :positions, :]
    return layer.keys, layer.values


def new_kv_cache(config: Any) -> DynamicCache:
    """An empty DynamicCache for `config`'s model, its full-attention layers `SpareRoomLayer`s (the others, such as
    sliding-window layers, as transformers makes them)."""
    cache = DynamicCache(config=config)
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        cache.layers = [SpareRoomLayer() if type(layer) is DynamicLayer else layer for layer in layers]
    return cache
