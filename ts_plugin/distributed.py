"""Rank information from torchrun, the process group, and agreement between ranks."""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Ranks":
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a plain worker is rank 0 of 1)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(ranks: Ranks, device_type: Optional[str]) -> torch.device:
    """cuda:LOCAL_RANK (TorchServe sets CUDA_VISIBLE_DEVICES per worker) unless deviceType is cpu or no GPU."""
    if device_type != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(ranks: Ranks, device: torch.device, timeout_s: Optional[float] = None) -> None:
    """One process group per worker: nccl on GPU, gloo on CPU. No-op for a single process."""
    if ranks.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world_size, timeout=timeout, **kwargs)
    logger.info("rank %d/%d: process group ready (%s)", ranks.rank, ranks.world_size, backend)


def any_rank_failed(failed: bool, device: torch.device) -> bool:
    """All-reduce an error flag, so every rank takes the same branch after a local failure."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failed
    flag = torch.tensor([1 if failed else 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
