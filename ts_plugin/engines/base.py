"""The contract between the base handler and the engines.

`ts_plugin.engines.load(LoadContext)` returns, for this rank, either a `StepModel` (a rank that runs the
generation loop) or a `Follower` (a pp stage that TorchServe never sends PREDICT to: it serves rank 0's
messages in a loop of its own). Every engine module has one `load(context)` with this signature.
"""
from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import torch

from ..prefix_cache import PrefixStore, distinct_layers, holds_tensors

if TYPE_CHECKING:
    from ..config import ModelConfig, ParallelLayout
    from ..distributed import Ranks

Progress = Callable[[str], None]


class EngineError(RuntimeError):
    """The engine cannot serve this model with this config; the message says what to change."""


def raise_if_any_rank_failed(failure: Optional[Exception], loading: str, group: Any = None) -> None:
    """After each rank tried to load `loading` (its stage, its part of the model): a rank that failed alone must
    not leave the others waiting for it later, so every rank learns whether any failed, and raises its own error
    or one that points at the failed rank's log."""
    from ..distributed import any_rank_failed

    if any_rank_failed(failure is not None, group):
        raise failure or EngineError(f"another rank failed to load {loading}; its model log says why")


@dataclass(frozen=True)
class LoadContext:
    """Everything an engine needs to build this rank's part of the model, from the validated config."""

    config: "ModelConfig"
    layout: "ParallelLayout"
    ranks: "Ranks"
    model_path: Path  # the HF model folder
    model_dir: Path  # the unpacked archive (files named in the config are relative to it)
    device: torch.device
    dtype: torch.dtype
    progress: Progress
    deepspeed_file: Dict[str, Any] = field(default_factory=dict)  # the JSON deepspeed.config names, as validated


class StepModel(Protocol):
    """One forward step over a batch, as `ts_plugin.generation` drives it on every rank that runs the loop.
    Engines subclass it for the defaults of the last three methods."""

    #: True where the chosen tokens are computed (the others receive them through share_tokens)
    samples_here: bool

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Any) -> Tuple[Optional[torch.Tensor], Any]:
        """Run one step; return (logits of the last position [batch, vocab] or None, the new cache)."""

    def share_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return the driver's tokens on every rank that runs the loop."""

    def row_groups(self, rows: int) -> List[range]:
        """Groups of rows generated concurrently, each by a loop of its own (default: the whole batch)."""
        return [range(rows)]

    def end(self, cache: Any) -> None:
        """Release the batch's cache (and tell follower ranks the batch is over)."""

    def select_rows(self, cache: Any, rows: List[int], crop: int) -> Any:
        """Keep only `rows` of the batch's cache, in that order, and drop its first `crop` positions (padding that
        no kept row attends); continuous batching removes finished and cancelled rows with it."""
        select_cache_rows(cache, rows, crop)
        return cache

    def merge(self, cache: Any, other: Any, pad: int, other_pad: int) -> Any:
        """`cache`'s rows, then `other`'s, after left-padding them with `pad` and `other_pad` positions to one
        length; `other` is used up. Continuous batching joins newly prefilled rows to the running batch with it."""
        merge_caches(cache, other, pad, other_pad)
        return cache

    def close(self) -> None:
        """Release what the model holds beyond memory (follower loops, offload folders); the worker stops."""

    # prefix caching (ts_plugin.prefix_cache): the scheduler decides, each rank keeps its part of the blocks
    prefix_store: PrefixStore

    def new_cache(self) -> Any:
        """An empty KV cache for one batch of this rank's layers."""

    def save_prefix(self, cache: Any, row: int, blocks: Sequence[Tuple[int, int]], block_size: int) -> None:
        """Keep blocks of `row` of the batch's cache: (block id, first position in the cache) each."""
        self.prefix_store.save(cache, row, blocks, block_size)

    def cache_from_prefix(self, blocks: Sequence[int]) -> Any:
        """A new one-row batch cache holding the kept `blocks`, in order (a prompt prefilled from there on)."""
        return self.prefix_store.fill(self.new_cache(), blocks)

    def drop_prefix(self, blocks: Sequence[int]) -> None:
        """Forget kept blocks (the scheduler evicted them)."""
        self.prefix_store.drop(blocks)


class Follower(abc.ABC):
    """A rank that serves another rank's messages instead of requests (pp stages 1..n-1)."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start serving in the background; return at once."""

    def close(self) -> None:
        """The worker stops (the loop ends when the driver says so or the process group goes away)."""

    @abc.abstractmethod
    def wait(self) -> Optional[BaseException]:
        """Return once the loop has ended (the driver said stop, or the process group went away); with the error
        that ended it, if any."""


Loaded = Union[StepModel, Follower]


class HFStepModel(StepModel):
    """A HuggingFace causal LM on one device (or tensor-parallel, where every rank runs the same step)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, share: Optional[Callable] = None,
                 samples_here: bool = True):
        self.model = model
        self.device = device
        self._share = share
        self.samples_here = samples_here
        self._extra = cache_kwargs(model)
        self.prefix_store = PrefixStore()

    def new_cache(self) -> Any:
        from ._kv_cache import new_kv_cache

        return new_kv_cache(self.model.config)

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, position_ids, cache):
        cache = cache if cache is not None else self.new_cache()
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=position_ids.to(self.device), use_cache=True, **self._extra(cache))
        return out.logits[:, -1, :].float(), output_cache(out)

    def share_tokens(self, tokens):
        return self._share(tokens) if self._share else tokens


def kv_bytes_per_token(hf_config: Any, dtype: torch.dtype, tp_size: int, stage_layers: Optional[int] = None) -> int:
    """Bytes of keys and values one token takes on a rank: its layers (`stage_layers`, default all) x its share of
    the kv heads (tp ranks split them) x head dim x 2 x the dtype's size."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layers = stage_layers or text.num_hidden_layers
    return 2 * layers * -(-kv_heads // tp_size) * head_dim * dtype.itemsize


def cache_kwargs(model: torch.nn.Module) -> Callable[[Any], dict]:
    """transformers 5 names the KV cache argument `cache`, 4.x `past_key_values`; only the last
    position's logits are needed where the model supports `logits_to_keep`."""
    parameters = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in parameters else "past_key_values"
    fixed = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    return lambda cache: {name: cache, **fixed}


def output_cache(output: Any) -> Any:
    return output["cache"] if "cache" in output else output.get("past_key_values")


def cache_layers(cache: Any) -> List[Any]:
    """The distinct layers of a transformers DynamicCache that hold tensors (pp stages alias other stages' slots
    to their own layers, so each is edited once)."""
    return [layer for layer in distinct_layers(cache) if holds_tensors(layer)]


def uneditable_layers(cache: Any) -> List[str]:
    """The kinds of `cache`'s layers that rows cannot join or leave: every layer but transformers' DynamicLayer,
    which keeps all positions (a sliding-window layer keeps a window of its own length, which left padding would
    shift)."""
    from transformers.cache_utils import DynamicLayer

    return sorted({type(layer).__name__ for layer in getattr(cache, "layers", None) or []
                   if type(layer) is not DynamicLayer})


def check_row_editable(cache: Any) -> None:
    """Refuse continuous batching where rows could not join and leave the cache."""
    kinds = uneditable_layers(cache)
    if kinds:
        raise EngineError(f"continuous batching needs a KV cache of full-attention layers; this model's cache has "
                          f"{', '.join(kinds)} (sliding-window or other layers). Set continuousBatching: false.")


def select_cache_rows(cache: Any, rows: List[int], crop: int) -> None:
    for layer in cache_layers(cache):
        index = torch.tensor(rows, dtype=torch.long, device=layer.keys.device)
        layer.keys = layer.keys.index_select(0, index)[..., crop:, :]
        layer.values = layer.values.index_select(0, index)[..., crop:, :]


def merge_caches(cache: Any, other: Any, pad: int, other_pad: int) -> None:
    from ._kv_cache import new_room

    mine, theirs = cache_layers(cache), cache_layers(other)
    if len(mine) != len(theirs):
        raise EngineError(f"cannot merge KV caches of {len(mine)} and {len(theirs)} layers")
    for layer, joining in zip(mine, theirs):
        old = (layer.keys, layer.values)
        rows, width = old[0].shape[0], old[0].shape[-2] + pad
        if joining.keys.shape[-2] + other_pad != width:
            raise EngineError(f"cannot merge KV caches of {width} and {joining.keys.shape[-2] + other_pad} positions")
        merged = new_room(layer, rows + joining.keys.shape[0], width)
        for target, running, joined in zip(merged, old, (joining.keys, joining.values)):
            # positions are dim -2; each part is padded on its left with zeros, which no row attends
            target[:rows, :, :pad].zero_()
            target[:rows, :, pad:] = running
            target[rows:, :, :other_pad].zero_()
            target[rows:, :, other_pad:] = joined.to(target.device)
