"""parallelType tp: DeepSpeed inference (AutoTP by default) over the worker's ranks."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig, ParallelLayout
from ..distributed import Ranks, any_rank_failed
from ..generation import HFStepModel
from ._hf import EngineError, Progress, load_causal_lm, peak_rss_mb, release_memory


def inference_config(config: ModelConfig, layout: ParallelLayout, model_dir: Path, device: torch.device,
                     dtype: torch.dtype) -> Dict[str, Any]:
    """DeepSpeed init_inference settings: the JSON file, then the inline `deepspeed` keys on top."""
    section = config.deepspeed
    settings: Dict[str, Any] = {}
    if section is not None and section.config:
        settings.update(json.loads((model_dir / section.config).read_text(encoding="utf-8")))
    if section is not None:
        inline = section.model_dump(exclude_none=True, exclude={"config", "checkpoint"}, exclude_unset=True)
        settings.update(inline)
    settings.pop("mp_size", None)  # deprecated spelling, validated equal to tp_size
    settings["tensor_parallel"] = {**settings.get("tensor_parallel", {}), "tp_size": layout.tp_size}
    settings["dtype"] = dtype
    kernel_inject = bool(settings.get("replace_with_kernel_inject", False))
    if kernel_inject and device.type != "cuda":
        raise EngineError("deepspeed.replace_with_kernel_inject needs a GPU; this worker runs on CPU. "
                          "Remove it (AutoTP works on CPU) or serve on a GPU host with deviceType gpu.")
    settings["replace_with_kernel_inject"] = kernel_inject
    if section is not None and section.checkpoint:
        if not kernel_inject:
            raise EngineError("deepspeed.checkpoint (DeepSpeed's meta-tensor loading) works only with "
                              "replace_with_kernel_inject on GPU; remove it to load the HF folder with AutoTP.")
        settings["checkpoint"] = str(model_dir / section.checkpoint)
    return settings


def _injection_policy(model: torch.nn.Module, policy: Dict[str, Any]) -> Dict[type, tuple]:
    """YAML gives class names; DeepSpeed wants the classes."""
    classes = {type(module).__name__: type(module) for module in model.modules()}
    resolved = {}
    for name, layers in policy.items():
        if name not in classes:
            raise EngineError(f"deepspeed.injection_policy names {name!r}, which is not a module class of "
                              f"{type(model).__name__}; classes: {', '.join(sorted(classes)[:12])}...")
        resolved[classes[name]] = tuple(layers if isinstance(layers, (list, tuple)) else [layers])
    return resolved


def load(config: ModelConfig, layout: ParallelLayout, ranks: Ranks, model_path: Path, model_dir: Path,
         device: torch.device, dtype: torch.dtype, progress: Progress) -> HFStepModel:
    """Load the HF model on every rank and shard it with DeepSpeed; returns this rank's step model."""
    import deepspeed

    settings = inference_config(config, layout, model_dir, device, dtype)
    if device.type == "cpu":
        # DeepSpeed's JIT shared-memory allreduce crashes on CPU hosts (see README); gloo's is used instead.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    progress(f"reading checkpoint {model_path} (peak RSS {peak_rss_mb():.0f} MiB)")
    model = load_causal_lm(model_path, dtype, config.handler.trust_remote_code)
    if "injection_policy" in settings:
        settings["injection_policy"] = _injection_policy(model, settings["injection_policy"])
    progress(f"sharding {type(model).__name__} with DeepSpeed tp_size={layout.tp_size} "
             f"({'kernel injection' if settings['replace_with_kernel_inject'] else 'AutoTP'})")
    try:
        engine = deepspeed.init_inference(model, config=settings)
    except Exception as error:  # noqa: BLE001 - DeepSpeed raises bare Exceptions/AssertionErrors
        if "AutoTP not supported" in str(error) or "kernel injection" in str(error):
            raise EngineError(
                f"DeepSpeed AutoTP cannot shard {type(model).__name__}: {error}. Give deepspeed.injection_policy "
                "(module class -> names of the layers whose output is all-reduced), or use kernel injection on a "
                "GPU host (replace_with_kernel_inject: true), or serve this model with parallelType pp.") from error
        raise
    module = engine.module.to(device)
    del model
    if device.type == "cpu":
        _own_memory(module)
        if ranks.world_size == 2:
            _use_pair_all_reduce(float(config.response_timeout), progress)
    release_memory()
    progress(f"shard ready (peak RSS {peak_rss_mb():.0f} MiB)")
    return HFStepModel(module, device, share=_broadcast_from_driver if ranks.world_size > 1 else None,
                       samples_here=ranks.is_driver)


def _broadcast_from_driver(tokens: torch.Tensor) -> torch.Tensor:
    # one small collective per step keeps every rank on rank 0's tokens, whatever float noise says
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = tokens.to(device)
    dist.broadcast(buffer, src=0)
    return buffer.cpu()


def _own_memory(module: torch.nn.Module) -> None:
    """Give every parameter and buffer memory of its own.

    transformers memory-maps safetensors checkpoints, and AutoTP copies out the slices it shards but leaves other
    tensors (embeddings, norms, ...) as they were loaded: still views of the file mapping. Each keeps its whole
    file mapped, with every page AutoTP read while slicing resident, so each rank went on holding about the whole
    checkpoint in RSS (measured: 542 MiB of mapped .safetensors pages beside a 390 MiB shard). Copying tensor by
    tensor (at most one extra tensor at a time) drops the last references to the mappings.
    """
    with torch.no_grad():
        for parameter in module.parameters():  # tied parameters are one object: they stay tied
            parameter.data = parameter.data.clone()
        for child in module.modules():
            for name, buffer in child._buffers.items():
                if buffer is not None:
                    child._buffers[name] = buffer.clone()


class _RankPair:
    """A Unix stream socket between the two ranks of a worker on one host, to all-reduce over.

    Rank 0 listens on an abstract socket name the kernel picks (autobind), sends the name to rank 1 over the
    process group, and accepts only the connection whose SO_PEERCRED pid is rank 1's. Sends and receives time out
    after the process group's timeout; a peer that exits closes the socket, and the waiting rank fails at once.
    """

    def __init__(self, timeout_s: float):
        import socket

        self.first = dist.get_rank() == 0
        pids: list = [None, None]
        dist.all_gather_object(pids, os.getpid())
        server = None
        name: list = [None]
        if self.first:
            try:
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.bind("")  # Linux autobind: a unique abstract name, nothing on the file system
                server.listen(1)
                name[0] = server.getsockname()
            except OSError as error:
                name[0] = error  # rank 1 must still get its answer
        dist.broadcast_object_list(name, src=0)
        try:
            if isinstance(name[0], OSError):
                raise name[0]
            if self.first:
                server.settimeout(timeout_s)
                while True:
                    conn, _ = server.accept()
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    if struct.unpack("3i", creds)[0] == pids[1]:
                        break
                    conn.close()  # not the other rank
            else:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.settimeout(timeout_s)
                conn.connect(name[0])
        finally:
            if server is not None:
                server.close()
        conn.settimeout(timeout_s)
        self.conn = conn
        self.broken: Optional[str] = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` (CPU, contiguous) with the other rank's, in place. Rank 0 sends first, rank 1 receives
        first, so no size can fill both sockets at once; a + b is the same IEEE sum on both ranks."""
        if self.broken:
            raise RuntimeError(f"the tensor-parallel link between the ranks failed earlier ({self.broken}); "
                               "this worker must be restarted")
        other = torch.empty_like(tensor)
        mine = memoryview(tensor.view(torch.uint8).numpy()).cast("B")
        theirs = memoryview(other.view(torch.uint8).numpy()).cast("B")
        try:
            if self.first:
                self.conn.sendall(mine)
                self._receive(theirs)
            else:
                self._receive(theirs)
                self.conn.sendall(mine)
        except OSError as error:  # timeout, or the other rank is gone: the stream is out of step from here on
            self.broken = f"{type(error).__name__}: {error}"
            raise RuntimeError(f"all-reduce with the other tensor-parallel rank failed: {self.broken}") from error
        return tensor.add_(other)

    def _receive(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            count = self.conn.recv_into(view[got:])
            if not count:
                raise ConnectionResetError("the other tensor-parallel rank closed the connection")
            got += count


def _use_pair_all_reduce(timeout_s: float, progress: Progress) -> None:
    """On CPU with 2 ranks, all-reduce through a socket between the ranks instead of gloo's allreduce.

    AutoTP all-reduces twice per decoder layer and once for the LM head, on a few KiB per decode step. On a
    2-core host one gloo allreduce of 4 KiB took ~0.8 ms (a gloo isend/irecv exchange ~0.5 ms: each message is
    handed between gloo's threads), the same bytes through a Unix socket ~0.04 ms; the all-reduces were about
    half of a tp 2 decode step. Other reductions, groups and devices keep DeepSpeed's path; if the socket cannot be
    set up, the ranks exchange with gloo's isend/irecv.
    """
    import deepspeed.comm.comm as ds_comm

    backend = getattr(ds_comm, "cdb", None)
    original = getattr(backend, "inference_all_reduce", None)
    if original is None or getattr(original, "_ts_plugin_pair", False):
        return
    pair: Optional[_RankPair] = None
    try:
        pair = _RankPair(timeout_s)
    except OSError as error:  # no AF_UNIX, a timeout, a refused connection
        progress(f"all-reduce over a Unix socket unavailable ({error}); using gloo send/recv")
    if any_rank_failed(pair is None, torch.device("cpu")) and pair is not None:  # both ranks take the same path
        pair.conn.close()
        pair = None

    def inference_all_reduce(tensor, op=ds_comm.ReduceOp.SUM, group=None):
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        if (ranks != [0, 1] or tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dim() == 0
                or backend._reduce_op(op) != dist.ReduceOp.SUM):
            return original(tensor, op, group)
        if pair is not None:
            return pair.all_reduce(tensor)
        other = torch.empty_like(tensor)
        peer = 1 - dist.get_rank()
        for work in (dist.isend(tensor, peer, group=group), dist.irecv(other, peer, group=group)):
            work.wait()
        return tensor.add_(other)

    inference_all_reduce.__wrapped__ = original
    inference_all_reduce._ts_plugin_pair = True
    backend.inference_all_reduce = inference_all_reduce
