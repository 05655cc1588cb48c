"""The parallelTypes ts_plugin serves: one record each, read by the schema, the layout, the rules, the engines'
loader, the CLI and the demo. Adding a parallelType takes a record here and an engine module with
`load(LoadContext)` (see ts_plugin.engines.base).

TorchServe 0.12's frontend knows only pp, tp, pptp and custom (any other name becomes an ordinary worker, its
parallelLevel ignored), so a new record that needs torchrun must reuse one of those names; a one-process engine
may take a name of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class ParallelType:
    name: str
    engine: str  # the module with load(LoadContext), imported when a worker starts
    torchrun: bool  # TorchServe starts one process per rank with torchrun; otherwise one process
    pipeline: bool = False  # ranks hold pipeline stages (the pippy section)
    tensor_parallel: bool = False  # ranks hold a share of each layer (the deepspeed section)
    device_map: bool = False  # one process spreads the model with an Accelerate device map (handler.device_map)
    summary: str = ""


#: parallelType -> its record; everything that needs the list reads it here
PARALLEL_TYPES: Dict[str, ParallelType] = {record.name: record for record in (
    ParallelType("pp", "ts_plugin.engines.pipeline", torchrun=True, pipeline=True,
                 summary="pipeline stages on torch.distributed, one per rank"),
    ParallelType("tp", "ts_plugin.engines.deepspeed", torchrun=True, tensor_parallel=True,
                 summary="DeepSpeed tensor parallelism, every rank a share of each layer"),
    ParallelType("pptp", "ts_plugin.engines.pptp", torchrun=True, pipeline=True, tensor_parallel=True,
                 summary="pipeline stages that are each tensor-parallel"),
    ParallelType("custom", "ts_plugin.engines.accelerate", torchrun=False, device_map=True,
                 summary="one process, an Accelerate device map over its GPUs, CPU and disk"),
)}


def parallel_type(name: Optional[str]) -> Optional[ParallelType]:
    """The record of a parallelType name (None for none or an unknown one)."""
    return PARALLEL_TYPES.get(name) if name else None


def names(**features: bool) -> str:
    """The parallelTypes with the given features, for messages: `names(pipeline=True)` -> "pp or pptp"."""
    chosen = [n for n, record in PARALLEL_TYPES.items()
              if all(getattr(record, key) == value for key, value in features.items())]
    return " or ".join(chosen)
