"""Values derived from a validated config: processes, GPUs, pipeline and tensor sizes."""
from __future__ import annotations

from dataclasses import dataclass

from .parallel_types import parallel_type
from .schema import ModelConfig


@dataclass(frozen=True)
class ParallelLayout:
    parallel_type: str  # "" when the config sets none (an ordinary worker)
    world_size: int  # processes per worker, on every node together (torchrun ranks; 1 for one-process types)
    gpus_per_worker: int  # on each node
    pp_size: int
    tp_size: int
    #: how long a collective waits for a peer: pippy.rpc_timeout for pp (its legacy meaning), else responseTimeout
    process_group_timeout_s: float
    uses_torchrun: bool = False

    @classmethod
    def of(cls, config: ModelConfig) -> "ParallelLayout":
        """Derive the layout the way TorchServe 0.12 launches the worker."""
        record = parallel_type(config.parallel_type)
        if record is not None and record.torchrun:
            # the torchrun section sets parallelLevel = nproc-per-node (default 1)
            if config.torchrun is not None:
                gpus = config.torchrun.nproc_per_node or 1
                world = gpus * config.torchrun.nnodes
            else:
                gpus = world = config.parallel_level or 1
        else:
            world = 1
            gpus = config.parallel_level or 1 if record is not None and record.device_map else 1
        if record is not None and record.pipeline and record.tensor_parallel:
            pp = (config.pippy.pp_size if config.pippy else None) or 1
        elif record is not None and record.pipeline:
            pp = world
        else:
            pp = 1
        tp = world // pp if pp and world % pp == 0 else 1
        rpc_timeout = config.pippy.rpc_timeout if config.parallel_type == "pp" and config.pippy else None
        return cls(config.parallel_type or "", world, gpus, pp, tp, float(rpc_timeout or config.response_timeout),
                   uses_torchrun=record is not None and record.torchrun)
