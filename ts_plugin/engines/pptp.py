"""parallelType pptp: pipeline stages that are each tensor-parallel, on a 2-D (pp, tp) device mesh.

World = pp_size x tp_size; rank r is stage r // tp_size, tensor-parallel rank r % tp_size. Inside a
stage, PyTorch's native tensor parallelism (`parallelize_module`, column-wise then row-wise Linear
layers, from the model's own `base_model_tp_plan`) shards the stage's layers over the stage's tp group.
Across stages, the pp engine's stage runner (`PipelineStage`: per-stage KV cache, any shape).

For pptp TorchServe sends every batch to EVERY rank, so every rank runs the shared generation loop on
the same inputs and knows every tensor shape without a header: stage s, tp rank t receives its input
from stage s-1, tp rank t, and sends its output to stage s+1, tp rank t. The last stage's tp rank 0
sends the logits to rank 0, which samples; the tokens are broadcast to all ranks.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ..config.rules import PPTP_HEADS_HINT, attention_split_problem
from ..distributed import Ranks, broadcast_tokens, collective_device
from ._checkpoint import Slicer, build_meta_model, materialize_stage, peak_rss_mb, release_memory
from .base import EngineError, LoadContext, StepModel, raise_if_any_rank_failed
from .pipeline import PipelineStage, split_stages


def tensor_parallel_plan(model: torch.nn.Module, layers_path: str, start: int, end: int) -> Dict[str, object]:
    """Module name -> Colwise/RowwiseParallel for this stage's layers, from the model's `base_model_tp_plan`."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    prefix = getattr(model, "base_model_prefix", "")
    layer_entries = {}
    for pattern, style in plan.items():
        full = f"{prefix}.{pattern}" if prefix else pattern
        if not full.startswith(layers_path + ".*."):
            continue  # embeddings / norms stay replicated
        if style not in styles:
            raise EngineError(f"parallelType pptp shards layers column- or row-wise; {type(model).__name__}'s "
                              f"tensor-parallel plan asks for {style!r} at {pattern}. Use parallelType pp or tp.")
        layer_entries[full[len(layers_path) + 3:]] = styles[style]
    if not layer_entries:
        raise EngineError(f"{type(model).__name__} has no tensor-parallel plan for its decoder layers "
                          "(config.base_model_tp_plan); parallelType pptp supports models that have one "
                          "(Llama, Mistral, Qwen2, ...). Use parallelType pp or tp.")
    return {f"{layers_path}.{i}.{suffix}": style() for i in range(start, end) for suffix, style in layer_entries.items()}


class _ShardAsRead(Slicer):
    """Read only this rank's chunk of each planned Linear weight, so a rank never holds its whole stage:
    column-wise layers split weight and bias along dim 0, row-wise ones the weight along dim 1 (the bias is added
    after the reduction, so it stays whole). Chunks follow DTensor's Shard (torch.chunk)."""

    def __init__(self, plan: Dict[str, object], tp_mesh):
        self.plan = plan
        self.mesh = tp_mesh
        self.rank, self.size = tp_mesh.get_local_rank(), tp_mesh.size()

    def _dim(self, name: str) -> Optional[int]:
        from torch.distributed.tensor.parallel import ColwiseParallel

        module, _, attr = name.rpartition(".")
        style = self.plan.get(module)
        if style is None:
            return None
        return 0 if isinstance(style, ColwiseParallel) else (1 if attr == "weight" else -1)

    def block(self, name: str, shape: Tuple[int, ...]) -> Optional[Tuple[slice, ...]]:
        dim = self._dim(name)
        if dim is None or dim < 0:
            return None
        chunk = math.ceil(shape[dim] / self.size)
        if chunk == 0 or math.ceil(shape[dim] / chunk) != self.size:
            raise EngineError(f"{name} {shape} cannot be split in {self.size} along dim {dim}")
        start = self.rank * chunk
        return tuple(slice(start, min(start + chunk, shape[dim])) if d == dim else slice(None)
                     for d in range(len(shape)))

    def wrap(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        dim = self._dim(name)
        if dim is None:
            return tensor
        placement = Replicate() if dim < 0 else Shard(dim)
        return DTensor.from_local(tensor, self.mesh, [placement], run_check=False)


class TensorParallelStage(StepModel):
    """A `StepModel` for one rank of a pp x tp grid; every rank runs the same generation loop."""

    def __init__(self, stage: PipelineStage, ranks: Ranks, tp_size: int, vocab_size: int, dtype: torch.dtype):
        self.stage = stage
        self.wire = collective_device()  # nccl takes CUDA tensors, gloo CPU ones
        self.rank = ranks.rank
        self.tp_size = tp_size
        self.tp_rank = ranks.rank % tp_size
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.samples_here = ranks.rank == 0
        self.hidden_size = stage.embedding_dim
        self.pool = stage.pool
        self.kv_layers = stage.info.most_layers

    def _peer(self, stage_offset: int) -> int:
        return (self.stage.info.index + stage_offset) * self.tp_size + self.tp_rank

    @torch.inference_mode()
    def forward(self, input_ids, batch):
        info = self.stage.info
        if info.is_first:
            inputs = input_ids
        else:
            inputs = torch.empty(1, batch.tokens, self.hidden_size, dtype=self.dtype, device=self.wire)
            dist.recv(inputs, src=self._peer(-1))
        output = self.stage.run(inputs, batch)
        if not info.is_last:
            dist.send(output.to(self.wire, self.dtype).contiguous(), dst=self._peer(+1))
            output = None
        logits = None
        if info.is_last and self.tp_rank == 0 and self.rank != 0:
            dist.send(output.to(self.wire).contiguous(), dst=0)
        elif info.is_last and self.rank == 0:
            logits = output
        if self.rank == 0 and not info.is_last:
            logits = torch.empty(len(batch.rows), self.vocab_size, dtype=torch.float32, device=self.wire)
            dist.recv(logits, src=(info.count - 1) * self.tp_size)
        return logits

    def share_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return broadcast_tokens(tokens)


def load(context: LoadContext) -> TensorParallelStage:
    """Build this rank's tensor-parallel shard of its pipeline stage."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from transformers import AutoConfig

    config, layout, ranks, device, dtype = context.config, context.layout, context.ranks, context.device, context.dtype
    hf_config = AutoConfig.from_pretrained(str(context.model_path), trust_remote_code=config.handler.trust_remote_code)
    problem = attention_split_problem(hf_config.get_text_config().to_dict(), layout.tp_size)
    if problem:  # the same verdict on every rank, before any collective; it would load, then fail every request
        raise EngineError(f"parallelType pptp with tp size {layout.tp_size}: {problem}. Fix: {PPTP_HEADS_HINT}")
    mesh = init_device_mesh(device.type, (layout.pp_size, layout.tp_size), mesh_dim_names=("pp", "tp"))
    stage_index = ranks.rank // layout.tp_size
    failure: Optional[Exception] = None
    try:
        model = build_meta_model(context.model_path, dtype, config.handler.trust_remote_code)
        layers_path, bounds = split_stages(model, layout.pp_size, config.pippy.split_points)
        plan = tensor_parallel_plan(model, layers_path, *bounds[stage_index])
        before = peak_rss_mb()
        info = materialize_stage(model, stage_index, bounds, layers_path, context.model_path, device, dtype,
                                 slicer=_ShardAsRead(plan, mesh["tp"]))
        parallelize_module(model, mesh["tp"], plan)  # the weights are DTensors already: this adds the layouts
        release_memory()
        stage = PipelineStage(model, info, device, dtype)
    except Exception as error:  # noqa: BLE001 - agree with the other ranks first, then raise
        failure = error
    raise_if_any_rank_failed(failure, "its part of the model")
    vocab = model.get_output_embeddings().weight.shape[0]
    context.progress(
        f"pptp stage {info.index + 1}/{info.count}, tp rank {ranks.rank % layout.tp_size + 1}/{layout.tp_size}: "
        f"{layers_path}.{info.start}..{info.end - 1} ({len(plan)} Linear modules sharded); peak RSS "
        f"{peak_rss_mb():.0f} MiB, {peak_rss_mb() - before:+.0f} MiB over the {before:.0f} MiB before reading "
        f"weights; stage weights {info.stage_bytes / 2**20:.1f} MiB, model {info.model_bytes / 2**20:.1f} MiB")
    return TensorParallelStage(stage, ranks, layout.tp_size, vocab, dtype)
