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
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Union

import torch

from ..kv_blocks import BLOCK_SIZE
from ._cpu_kernels import use_small_batch_linears
from ._compiled import compile_forward, step_kwargs
from ._paged import KVPool, PagedBatch, use_paged_attention

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
    """One forward step over a flat batch, as `ts_plugin.continuous` drives it on every rank that runs the loop.
    Engines subclass it for the defaults of the last two methods.

    The batch is every scheduled row's new tokens side by side; `batch` (engines/_paged.py) says where each row's
    keys and values go in this rank's `pool` and what each row attends. The engine runs its part of the model over
    it; the blocks themselves are the loop's (ts_plugin.kv_blocks)."""

    #: True where the chosen tokens are computed (the others receive them through share_tokens)
    samples_here: bool
    #: this rank's keys and values (its layers, its kv heads)
    pool: KVPool
    #: the most decoder layers whose keys and values one rank keeps (a pp stage's); None: every layer
    kv_layers: Optional[int] = None

    def forward(self, input_ids: torch.Tensor, batch: PagedBatch) -> Optional[torch.Tensor]:
        """Run one step of `input_ids` (`[tokens]`); return the logits of each row's last new token (`[rows,
        vocab]`, float32) where samples_here, else None."""

    def share_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return the driver's tokens on every rank that runs the loop."""

    def row_groups(self, rows: int) -> List[range]:
        """Groups of rows generated concurrently, each by a loop of its own (default: the whole batch)."""
        return [range(rows)]

    def close(self) -> None:
        """Release what the model holds beyond memory (follower loops, offload folders); the worker stops."""


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
    """A HuggingFace causal LM on one device (or tensor-parallel, where every rank runs the same step); with
    `compile_step` its step's forward is compiled at load (engines/_compiled.py)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, share: Optional[Callable] = None,
                 samples_here: bool = True, compile_step: bool = False, progress: Optional[Progress] = None):
        self.model = model
        self.device = device
        self._share = share
        self.samples_here = samples_here
        self.pool = KVPool(BLOCK_SIZE)
        use_paged_attention(model)
        use_small_batch_linears(model)
        self._inputs = step_kwargs(device, logits_to_keep(model))
        self._compiled = compile_forward(model, self._inputs, progress) if compile_step else None

    @torch.inference_mode()
    def forward(self, input_ids, batch):
        inputs = self._inputs(input_ids, batch)
        out = self._compiled(batch, inputs) if self._compiled else self.model(**inputs, paged=batch)
        return rows_logits(out.logits, batch)

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


def logits_to_keep(model: torch.nn.Module) -> Callable[[PagedBatch], dict]:
    """Where the model's forward takes `logits_to_keep`, it computes only each row's last position's logits."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return lambda batch: {"logits_to_keep": batch.last_tokens}
    return lambda batch: {}


def rows_logits(logits: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """`[rows, vocab]` float32: each row's last new token's logits, from the model's `[1, kept, vocab]`."""
    logits = logits[0]
    if logits.shape[0] != len(batch.rows):
        logits = logits.index_select(0, batch.last_tokens.to(logits.device))
    return logits.float()
