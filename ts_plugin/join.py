"""`ts-plugin join`: the other nodes of a model served across hosts (`torchrun.nnodes` > 1).

TorchServe 0.12 launches `torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint E --rdzv-id
<model>_<port> --max-restarts 1 ...` on its own host only, and talks to that host's ranks only. On each other
node, `join` runs torchrun with the same rendezvous. Its ranks load the archive with TorchServe's own model loader
and the archive's handler, as a worker would, and then serve global rank 0, which is always on the frontend's host
(`distributed.frontend_first`): pp and pptp stages as followers, tp ranks through rank 0's step-loop decisions.
No request ever reaches them.

A round ends when the frontend's worker goes (a rank died, the model was unregistered or scaled down): torchrun
exits, and `join` starts it again, so the node joins the worker that TorchServe starts next. torchrun's own
`--max-restarts` would not do: the frontend's torchrun hosts the rendezvous store, which leaves with it.

The rendezvous id is `<model name>_<worker port>`. The port is the worker's id in TorchServe's management API
(`GET /models/<name>`), which `join --management-address` reads before each round: TorchServe gives each torchrun
worker it starts the next `nproc-per-node` ports from `initial_distribution_port` (29500 by default), so a worker
of a model registered again, or of a second model, has another id. One join serves a model's first worker: give
a model across nodes `minWorkers: 1` and `maxWorkers: 1`, or run one join per worker with `--rdzv-id`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .config import ModelConfig, ValidationContext, validate_file

logger = logging.getLogger(__name__)


class JoinError(ValueError):
    """The archive cannot be served across nodes as given; the message says what to change."""


@dataclass(frozen=True)
class JoinPlan:
    """What `join` runs on this node: torchrun's command line and environment, and the model folder it serves."""

    model_dir: Path
    rdzv_id: str
    command: List[str]
    env: Dict[str, str]


def unpack_archive(model: Path, into: Path) -> Path:
    """The model folder of `model`: a .mar (a zip, unpacked into `into`) or a folder made with
    `--archive-format no-archive`."""
    if model.is_dir():
        return model
    if not zipfile.is_zipfile(model):
        raise JoinError(f"{model} is neither a model folder nor a .mar archive")
    with zipfile.ZipFile(model) as archive:
        archive.extractall(into)
    return into


def plan_join(model: Path, workdir: Path, rdzv_id: str, rdzv_endpoint: Optional[str] = None) -> JoinPlan:
    """Unpack `model` into `workdir` and check its model-config.yaml; return the torchrun that joins the
    frontend's rendezvous `rdzv_id` at `rdzv_endpoint` (default: the config's torchrun.rdzv-endpoint).

    Example::

        plan = plan_join(Path("llama-pp.mar"), Path("/tmp/join"), "llama-pp_29500")
        subprocess.run(plan.command, env=plan.env)
    """
    model_dir = unpack_archive(Path(model), Path(workdir))
    manifest = read_manifest(model_dir)
    config_name = manifest.get("configFile")
    if not config_name:
        raise JoinError(f"{model} was archived without --config-file: nnodes comes from its model-config.yaml")
    report = validate_file(model_dir / config_name, ValidationContext(model_dir=model_dir))
    if not report.ok:
        raise JoinError(f"{config_name} has {len(report.errors)} error(s):\n{report.text()}")
    config: ModelConfig = report.config
    torchrun = config.torchrun
    if torchrun is None or torchrun.nnodes < 2:
        raise JoinError(f"{config_name} sets torchrun.nnodes {torchrun.nnodes if torchrun else 1}: this model runs on "
                        "the frontend's host alone, with no node to join")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(torchrun.nnodes),
               "--nproc-per-node", str(report.layout.gpus_per_worker), "--rdzv-backend", torchrun.rdzv_backend,
               "--rdzv-endpoint", rdzv_endpoint or torchrun.rdzv_endpoint, "--rdzv-id", rdzv_id,
               "--max-restarts", "0", "-m", "ts_plugin._joined_rank", str(model_dir)]
    from .distributed import JOINED_ENV

    env = {**os.environ, JOINED_ENV: "1", "OMP_NUM_THREADS": str(torchrun.omp_number_threads)}
    return JoinPlan(model_dir, rdzv_id, command, env)


def read_manifest(model_dir: Path) -> dict:
    """The `model` part of the archive's MAR-INF/MANIFEST.json."""
    manifest = model_dir / "MAR-INF" / "MANIFEST.json"
    if not manifest.is_file():
        raise JoinError(f"{model_dir} holds no MAR-INF/MANIFEST.json: make it with torch-model-archiver or "
                        "ts-plugin archive")
    return json.loads(manifest.read_text(encoding="utf-8"))["model"]


def frontend_rdzv_id(management_address: str, model_name: str, key: Optional[str] = None) -> str:
    """The rendezvous id of `model_name`'s first worker, from TorchServe's management API: `<name>_<worker id>`
    (a torchrun worker's id is its port). Waits as long as the model has no worker (the frontend is down, the
    model not registered yet), saying why once a minute; a refused key fails at once.

    Example::

        frontend_rdzv_id("http://10.0.0.1:8081", "llama-pp")  # "llama-pp_29500"
    """
    url = f"{management_address.rstrip('/')}/models/{model_name}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    said = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                workers = json.loads(answer.read())[0].get("workers") or []
            if workers:
                return f"{model_name}_{workers[0]['id']}"
            problem = "the model has no worker yet"
        except urllib.error.HTTPError as error:
            text = error.read().decode("utf-8", "replace")
            if error.code in (401, 403) or "Token Authorization" in text:
                raise JoinError(f"{url} refused the management key: give --management-key, the `management` key of "
                                "the frontend's key_file.json (TorchServe makes new keys at every start)") from None
            problem = f"HTTP {error.code}"
        except (OSError, ValueError) as error:
            problem = str(error)
        now = time.monotonic()
        if now - said >= 60:
            logger.info("waiting for a worker of %s at %s (%s)", model_name, url, problem)
            said = now
        time.sleep(2.0)


def join(model: Path, rdzv_id: Callable[[str], str], rdzv_endpoint: Optional[str] = None,
         rounds: Optional[int] = None, retry_s: float = 5.0) -> int:
    """Serve this node's part of `model` in the frontend's rendezvous, one round per worker the frontend starts,
    `rounds` times (None: until interrupted). `rdzv_id(model_name)` gives each round's rendezvous id (see
    frontend_rdzv_id). Returns the last torchrun's exit code.

    Example::

        join(Path("llama-pp.mar"), lambda name: frontend_rdzv_id("http://10.0.0.1:8081", name))
    """
    workdir = Path(tempfile.mkdtemp(prefix="ts_plugin-join-"))
    try:
        model_dir = unpack_archive(Path(model), workdir)
        name = read_manifest(model_dir)["modelName"]
        code, served = 0, 0
        while rounds is None or served < rounds:
            plan = plan_join(model_dir, workdir, rdzv_id(name), rdzv_endpoint)
            endpoint = plan.command[plan.command.index("--rdzv-endpoint") + 1]
            logger.info("joining rendezvous %s at %s", plan.rdzv_id, endpoint)
            code = subprocess.call(plan.command, env=plan.env)
            served += 1
            last = rounds is not None and served >= rounds
            logger.info("torchrun left the rendezvous (exit code %d)%s", code,
                        "" if last else f"; joining again in {retry_s:.0f} s")
            if not last:
                time.sleep(retry_s)
        return code
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
