"""SpareRoomLayer (ts_plugin.engines._kv_cache): the same keys and values as transformers' DynamicLayer, written in
place, and correct after continuous batching's edits assign other tensors to it."""
import torch
from transformers import AutoConfig, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ts_plugin.engines._kv_cache import SPARE, SpareRoomLayer, new_kv_cache
from ts_plugin.engines.base import merge_caches, select_cache_rows


def _states(rows, positions, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2, positions, 4, generator=generator),
            torch.randn(rows, 2, positions, 4, generator=generator))


def _both(*updates):
    """Apply the same updates to a DynamicLayer and a SpareRoomLayer; check that they agree after each."""
    plain, roomy = DynamicLayer(), SpareRoomLayer()
    for keys, values in updates:
        expected = plain.update(keys, values)
        got = roomy.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
    return plain, roomy


def test_decode_steps_write_in_place_and_match_concatenation():
    plain, roomy = _both(_states(3, 5, 0))
    rooms = set()
    for seed in range(1, 2 * SPARE):  # from 5 positions of 5 + SPARE: full after SPARE steps, then one move
        keys, values = _states(3, 1, seed)
        plain.update(keys, values)
        roomy.update(keys, values)
        rooms.add(roomy.keys.data_ptr())
    assert torch.equal(plain.keys, roomy.keys) and torch.equal(plain.values, roomy.values)
    assert len(rooms) == 2


def test_rows_selected_merged_and_cropped_stay_right():
    plain_cache, roomy_cache = DynamicCache(), DynamicCache()
    plain_cache.layers, roomy_cache.layers = [DynamicLayer()], [SpareRoomLayer()]
    for cache in (plain_cache, roomy_cache):
        cache.layers[0].update(*_states(3, 6, 0))
        cache.layers[0].update(*_states(3, 1, 1))
        select_cache_rows(cache, [2, 0], crop=2)  # a row leaves, the padding before the others goes
        cache.layers[0].update(*_states(2, 1, 2))
        joining = DynamicCache()
        joining.layers = [DynamicLayer()]
        joining.layers[0].update(*_states(1, 3, 3))
        merge_caches(cache, joining, pad=0, other_pad=3)
        cache.layers[0].update(*_states(3, 1, 4))
        cache.layers[0].crop(-2)
        cache.layers[0].update(*_states(3, 2, 5))
    plain, roomy = plain_cache.layers[0], roomy_cache.layers[0]
    assert roomy.keys.shape == (3, 2, 7, 4)
    assert torch.equal(plain.keys, roomy.keys) and torch.equal(plain.values, roomy.values)


def test_new_kv_cache_keeps_sliding_window_layers():
    config = AutoConfig.for_model("mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100, sliding_window=8)
    config.layer_types = ["full_attention", "sliding_attention"]
    kinds = [type(layer) for layer in new_kv_cache(config).layers]
    assert kinds == [SpareRoomLayer, DynamicSlidingWindowLayer]


def test_merged_rows_land_in_room_the_next_steps_append_to():
    cache, joining = DynamicCache(), DynamicCache()
    cache.layers, joining.layers = [SpareRoomLayer()], [DynamicLayer()]
    cache.layers[0].update(*_states(2, 4, 0))
    joining.layers[0].update(*_states(1, 6, 1))
    merge_caches(cache, joining, pad=2, other_pad=0)
    layer = cache.layers[0]
    merged = layer.keys.data_ptr()
    layer.update(*_states(3, 1, 2))
    assert layer.keys.data_ptr() == merged and layer.keys.shape == (3, 2, 7, 4)
    assert torch.equal(layer.keys[:2, :, :2], torch.zeros(2, 2, 2, 4))  # the running rows' new left padding
