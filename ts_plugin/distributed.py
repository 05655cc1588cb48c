"""Rank information from torchrun, the process group, and agreement between ranks."""
from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "Ranks":
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a plain worker is rank 0 of 1)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


class StaleRankError(RuntimeError):
    """This rank's torchrun agent is gone: TorchServe has already replaced it."""


PR_SET_PDEATHSIG = 1  # linux/prctl.h
_TORCHRUN_MARKS = (b"torchrun", b"torch.distributed.run", b"torch/distributed/run.py")


def bind_to_launcher(ranks: Ranks) -> None:
    """Under torchrun: die with the torchrun agent, and refuse to load in a rank whose agent is already gone.

    When a rank dies, the frontend SIGKILLs that worker's torchrun and starts a new one, while torchrun itself
    may just have restarted the group (TorchServe passes --max-restarts 1). Those restarted ranks are orphans
    (torchrun starts ranks in sessions of their own) and bind the same socket names as the new ranks; if the
    frontend connects to one, its LOAD would wait in init_process_group on a dead store for the whole
    process-group timeout, and a rank left over after its agent was killed keeps the model in memory. So: a
    loaded rank gets PR_SET_PDEATHSIG (SIGKILL when the agent dies), and a rank whose agent is gone at LOAD
    fails at once, which makes the frontend start over right away.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        logger.warning("could not set PR_SET_PDEATHSIG; this rank may outlive its torchrun agent")
    parent = os.getppid()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    orphaned = parent == 1  # the agent died before prctl, so no signal will ever come
    if not orphaned and restart > 0:
        # a rank from torchrun's own restart is fine under a live agent (a rank died before the frontend connected);
        # under anything else (a subreaper adopted it) it is an orphan of a killed agent
        try:
            cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
            orphaned = not any(mark in cmdline for mark in _TORCHRUN_MARKS)
        except OSError:
            orphaned = True
    if orphaned:
        raise StaleRankError(
            f"rank {ranks.rank} (torchrun restart #{restart}) has lost the torchrun agent that started it (now a child "
            f"of pid {parent}); TorchServe has replaced that torchrun, so this rank refuses to load")


def pick_device(ranks: Ranks, device_type: Optional[str]) -> torch.device:
    """cuda:LOCAL_RANK (TorchServe sets CUDA_VISIBLE_DEVICES per worker) unless deviceType is cpu or no GPU."""
    if device_type != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


#: set by `ts-plugin join` for the ranks it starts: they run on another node than TorchServe's frontend
JOINED_ENV = "TS_PLUGIN_JOINED"


def init_process_group(ranks: Ranks, device: torch.device, timeout_s: Optional[float] = None) -> Ranks:
    """One process group per worker: nccl on GPU, gloo on CPU. No-op for a single process. Returns this rank's
    place in the group: across nodes, the frontend's host holds ranks 0..nproc-per-node - 1 (frontend_first)."""
    if ranks.world_size == 1 or dist.is_initialized():
        return ranks
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world_size, timeout=timeout, **kwargs)
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        ranks = frontend_first(ranks, backend, timeout, kwargs)
    logger.info("rank %d/%d: process group ready (%s)", ranks.rank, ranks.world_size, backend)
    return ranks


class RoleError(RuntimeError):
    """The nodes of a rendezvous are not one TorchServe host and `ts-plugin join` agents."""


def frontend_first(ranks: Ranks, backend: str, timeout: Optional[datetime.timedelta], kwargs: dict) -> Ranks:
    """Renumber the default group so that the frontend's host holds ranks 0..P-1, then the other nodes' in
    torchrun's order. torchrun's c10d rendezvous numbers nodes by their address and process id, while TorchServe
    talks to its own host's ranks only and reads rank 0's answers. Every rank tells the others whether `ts-plugin
    join` started it; where the frontend's node is not first, the group is made again on the same store under a
    prefix of its own (a nonce from the first group's rank 0, so no key of an earlier group is read)."""
    from uuid import uuid4

    places: list = [None] * ranks.world_size
    me = (os.environ.get(JOINED_ENV) == "1", int(os.environ.get("GROUP_RANK", "0")), ranks.local_rank, uuid4().hex)
    dist.all_gather_object(places, me)
    frontends = sorted({node for joined, node, _, _ in places if not joined})
    if len(frontends) != 1:
        found = f"nodes {frontends} run" if frontends else "no node runs"
        raise RoleError(f"{found} TorchServe in rendezvous {os.environ.get('TORCHELASTIC_RUN_ID', '')!r}: it needs "
                        "TorchServe's host and `ts-plugin join` on each other node (nnodes counts them all)")
    order = sorted(range(ranks.world_size), key=lambda rank: places[rank][:3])  # the frontend's (not joined) first
    if order == list(range(ranks.world_size)):
        return ranks
    rank = order.index(ranks.rank)
    # the default group's own store (torchrun's agent store, or rank 0's): it outlives the group it served
    store = dist.PrefixStore(f"ts_plugin/frontend_first/{places[0][3]}", dist.distributed_c10d._get_default_store())
    dist.destroy_process_group()
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=ranks.world_size, timeout=timeout,
                            **kwargs)
    os.environ["RANK"] = str(rank)  # for libraries that read it (DeepSpeed)
    logger.info("rank %d is rank %d: the frontend's node goes first", ranks.rank, rank)
    return Ranks(rank, ranks.world_size, ranks.local_rank)


def collective_device(group=None) -> torch.device:
    """Where a group's collectives take tensors: the current CUDA device for nccl, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank_failed(failed: bool, group=None) -> bool:
    """All-reduce an error flag, so every rank takes the same branch after a local failure."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return failed
    flag = torch.tensor([1 if failed else 0], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def broadcast_tokens(tokens: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """Rank `src`'s tokens on every rank of the group (returned on the CPU, where the loop keeps them): one small
    collective per step keeps every rank on the driver's tokens, whatever float noise says."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tokens
    buffer = tokens.to(collective_device(group))
    dist.broadcast(buffer, src=src, group=group)
    return buffer.cpu()


#: how a lost peer shows in the errors of gloo and nccl
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "nccl communicator was aborted")


class InStepError(RuntimeError):
    """A step failed and every rank of the worker knows it (the driver shared the failure, or no other rank took
    part in the step), so the ranks are still in step and the worker serves on."""


def peer_lost(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says another rank of this worker is gone."""
    while error is not None:
        if any(mark in str(error).lower() for mark in _PEER_LOST):
            return True
        error = error.__cause__ or error.__context__
    return False


#: how often the ranks of a worker check that all of them still answer (watch_peers)
WATCH_INTERVAL_S = 5.0


def watch_peers(ranks: Ranks, timeout_s: float, interval_s: float = WATCH_INTERVAL_S) -> None:
    """Every `interval_s`, the ranks meet in a barrier of their own (a gloo group beside the worker's); a rank that
    does not arrive within `timeout_s` (stopped, or stuck outside a collective) makes the others leave the worker,
    so TorchServe restarts it. Without this a hung rank shows only when the next request times out, and an idle
    worker keeps a dead rank indefinitely. Every rank calls it once, after loading (creating the group is a
    collective); the barrier runs in a thread of its own, so a long step does not delay it."""
    if ranks.world_size == 1 or not dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    group = dist.new_group(backend="gloo", timeout=timeout)

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            try:
                dist.monitored_barrier(group, timeout=timeout, wait_all_ranks=True)
            except Exception as error:  # noqa: BLE001 - whatever the barrier says, a peer did not answer in time
                if not dist.is_initialized():
                    return  # this rank destroyed its process groups: it is shutting down, not failing
                leave_worker(ranks, error, f"a rank of this worker did not answer within {timeout_s:.0f} s")

    threading.Thread(target=watch, name="ts_plugin-watch-peers", daemon=True).start()


def leave_worker(ranks: Ranks, error: BaseException, why: Optional[str] = None) -> None:
    """End this rank at once, without answering, after a failure that left the ranks out of step: another rank is
    gone, or this one failed alone while its peers wait in a collective it will never join (pairing the next
    collectives with those would hang or give wrong sums). torchrun then ends the other ranks, and TorchServe
    fails the requests in flight and restarts the worker.

    Why without an answer: an answer sent now reaches the frontend while it restarts the worker. TorchServe 0.12
    then files that answer as one of the new generation's LOAD replies, reports READY before every new rank has
    loaded, and from there pairs every request with the reply to the previous one (seen in CI: the first request
    after the restart got `Backend response time: 0` and no answer)."""
    if why is None:
        why = "another rank of this worker is gone" if peer_lost(error) else "this rank failed alone, out of step"
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        why += (f" (its ranks span {os.environ['GROUP_WORLD_SIZE']} nodes: the error below names the peer's address; "
                "a node whose ranks ended rejoins through `ts-plugin join`)")
    logger.error("rank %d/%d: %s (%s: %s); exiting without an answer so that TorchServe restarts the worker "
                 "cleanly", ranks.rank, ranks.world_size, why, type(error).__name__, error, exc_info=error)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(70)
