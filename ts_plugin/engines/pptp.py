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

from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig, ParallelLayout
from ..distributed import Ranks, any_rank_failed
from ._hf import EngineError, Progress, peak_rss_mb, release_memory
from .pipeline import PipelineStage, build_meta_model, find_layer_list, materialize_stage, stage_bounds


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


def _shard_as_read(plan: Dict[str, object], tp_mesh) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """Keep only this rank's chunk of each planned Linear weight as it is read, so a rank never holds its
    whole stage: column-wise layers split weight and bias along dim 0, row-wise ones the weight along dim 1
    (the bias is added after the reduction, so it stays whole). Chunks follow DTensor's Shard (torch.chunk)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel

    rank, size = tp_mesh.get_local_rank(), tp_mesh.size()

    def shard(name: str, tensor: torch.Tensor) -> torch.Tensor:
        module, _, attr = name.rpartition(".")
        style = plan.get(module)
        if style is None:
            return tensor
        dim = 0 if isinstance(style, ColwiseParallel) else (1 if attr == "weight" else None)
        if dim is None:
            return DTensor.from_local(tensor, tp_mesh, [Replicate()], run_check=False)
        chunks = torch.chunk(tensor, size, dim=dim)
        if len(chunks) != size:
            raise EngineError(f"{name} {tuple(tensor.shape)} cannot be split in {size} along dim {dim}")
        return DTensor.from_local(chunks[rank].clone(), tp_mesh, [Shard(dim)], run_check=False)

    return shard


class TensorParallelStage:
    """A `StepModel` for one rank of a pp x tp grid; every rank runs the same generation loop."""

    def __init__(self, stage: PipelineStage, ranks: Ranks, tp_size: int, vocab_size: int, dtype: torch.dtype):
        self.stage = stage
        self.rank = ranks.rank
        self.tp_size = tp_size
        self.tp_rank = ranks.rank % tp_size
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.samples_here = ranks.rank == 0
        self.hidden_size = stage.embedding_dim

    def _peer(self, stage_offset: int) -> int:
        return (self.stage.info.index + stage_offset) * self.tp_size + self.tp_rank

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, position_ids, cache):
        info = self.stage.info
        cache = cache if cache is not None else self.stage.new_cache()
        rows, width = input_ids.shape
        if info.is_first:
            inputs = input_ids
        else:
            inputs = torch.empty(rows, width, self.hidden_size, dtype=self.dtype)
            dist.recv(inputs, src=self._peer(-1))
        output = self.stage.run(inputs, attention_mask, position_ids, cache)
        if not info.is_last:
            dist.send(output.to(self.dtype).cpu().contiguous(), dst=self._peer(+1))
            output = None
        logits = None
        if info.is_last and self.tp_rank == 0 and self.rank != 0:
            dist.send(output.cpu().contiguous(), dst=0)
        elif info.is_last and self.rank == 0:
            logits = output
        if self.rank == 0 and not info.is_last:
            logits = torch.empty(rows, self.vocab_size, dtype=torch.float32)
            dist.recv(logits, src=(info.count - 1) * self.tp_size)
        return logits, cache

    def share_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tokens, src=0)
        return tokens

    def end(self, cache) -> None:
        pass


def load(config: ModelConfig, layout: ParallelLayout, ranks: Ranks, model_path: Path, device: torch.device,
         dtype: torch.dtype, progress: Progress) -> TensorParallelStage:
    """Build this rank's tensor-parallel shard of its pipeline stage."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh(device.type, (layout.pp_size, layout.tp_size), mesh_dim_names=("pp", "tp"))
    stage_index = ranks.rank // layout.tp_size
    failure: Optional[Exception] = None
    try:
        model = build_meta_model(model_path, dtype, config.handler.trust_remote_code)
        layers_path, layers = find_layer_list(model)
        bounds = stage_bounds(len(layers), layout.pp_size, layers_path, config.pippy.split_points)
        plan = tensor_parallel_plan(model, layers_path, *bounds[stage_index])
        before = peak_rss_mb()
        info = materialize_stage(model, stage_index, bounds, layers_path, model_path, device, dtype,
                                 shard=_shard_as_read(plan, mesh["tp"]))
        parallelize_module(model, mesh["tp"], plan)  # the weights are DTensors already: this adds the layouts
        release_memory()
        stage = PipelineStage(model, info, device, dtype)
    except Exception as error:  # noqa: BLE001 - agree with the other ranks first, then raise
        failure = error
    if any_rank_failed(failure is not None, torch.device("cpu")) and failure is None:
        failure = EngineError("another rank failed to load its part of the model; its model log says why")
    if failure is not None:
        raise failure
    vocab = model.get_output_embeddings().weight.shape[0]
    progress(f"pptp stage {info.index + 1}/{info.count}, tp rank {ranks.rank % layout.tp_size + 1}/{layout.tp_size}: "
             f"{layers_path}.{info.start}..{info.end - 1} ({len(plan)} Linear modules sharded); peak RSS {peak_rss_mb():.0f} MiB, "
             f"{peak_rss_mb() - before:+.0f} MiB over the {before:.0f} MiB before reading weights; stage weights "
             f"{info.stage_bytes / 2**20:.1f} MiB, model {info.model_bytes / 2**20:.1f} MiB")
    return TensorParallelStage(stage, ranks, layout.tp_size, vocab, dtype)
