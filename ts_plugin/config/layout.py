"""Values derived from a validated config: processes, GPUs, pipeline and tensor sizes."""
from __future__ import annotations

from dataclasses import dataclass

from .schema import TORCHRUN_PARALLEL_TYPES, ModelConfig


@dataclass(frozen=True)
class ParallelLayout:
    parallel_type: str  # "" when the config sets none (an ordinary worker)
    world_size: int  # processes per worker (torchrun ranks; 1 for custom)
    gpus_per_worker: int
    pp_size: int
    tp_size: int
    #: how long a collective waits for a peer: pippy.rpc_timeout for pp (its legacy meaning), else responseTimeout
    process_group_timeout_s: float

    @property
    def uses_torchrun(self) -> bool:
        return self.parallel_type in TORCHRUN_PARALLEL_TYPES

    @classmethod
    def of(cls, config: ModelConfig) -> "ParallelLayout":
        """Derive the layout the way TorchServe 0.12 launches the worker."""
        ptype = config.parallel_type or ""
        if ptype in TORCHRUN_PARALLEL_TYPES:
            # the torchrun section sets parallelLevel = nproc-per-node (default 1)
            if config.torchrun is not None:
                world = config.torchrun.nproc_per_node or 1
            else:
                world = config.parallel_level or 1
            gpus = world
        else:
            world = 1
            gpus = config.parallel_level or 1 if ptype == "custom" else 1
        if ptype == "pp":
            pp = world
        elif ptype == "pptp":
            pp = (config.pippy.pp_size if config.pippy else None) or 1
        else:
            pp = 1
        tp = world // pp if pp and world % pp == 0 else 1
        rpc_timeout = config.pippy.rpc_timeout if ptype == "pp" and config.pippy else None
        return cls(ptype, world, gpus, pp, tp, float(rpc_timeout or config.response_timeout))
