"""The tp engine's CPU all-reduce: DeepSpeed's own shared-memory op, under real torchrun (gloo on CPU). With it
on (3 ranks) sums of every size are exact and the same bits on every rank, and no segment name is left in
/dev/shm; where one rank cannot build it (no compiler), every rank turns it off and sums go over gloo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import pytest

from ts_plugin.testing import free_ports

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"

SCRIPT = textwrap.dedent(r'''
    import json, os, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from ts_plugin.distributed import Ranks
    from ts_plugin.engines._cpu_tp import use_shared_memory_all_reduce

    out_dir, broken_rank, sizes = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    dist.init_process_group("gloo")
    ranks = Ranks.from_env()
    if ranks.rank == broken_rank:  # as on a host without a C++ compiler
        os.environ["CXX"] = "/bin/false"
        os.environ["TORCH_EXTENSIONS_DIR"] = str(out_dir / "extensions")
    log = []
    on = use_shared_memory_all_reduce(ranks, log.append)

    import deepspeed.comm as ds_comm
    ds_comm.init_distributed(dist_backend="gloo")  # a no-op where the engine started it
    sums = []
    for size in sizes:
        part = torch.arange(size, dtype=torch.float32) * (ranks.rank + 1) + 0.1 * ranks.rank
        total = sum(torch.arange(size, dtype=torch.float32) * (r + 1) + 0.1 * r for r in range(ranks.world_size))
        ds_comm.comm.cdb.inference_all_reduce(part, ds_comm.ReduceOp.SUM)
        sums.append(torch.allclose(part, total))
        gathered = [torch.empty_like(part) for _ in range(ranks.world_size)]
        dist.all_gather(gathered, part)
        sums.append(all(torch.equal(g, part) for g in gathered))
    dist.barrier()
    port = os.environ["MASTER_PORT"]
    left = [name for name in os.listdir("/dev/shm") if f"_{port}_" in name]
    (out_dir / f"rank{ranks.rank}.json").write_text(json.dumps(
        {"on": on, "log": log, "sums": sums, "left": left,
         "op": hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_")}))
    os._exit(0)
''')


SIZES = (1, 1024, 3 * 2**20 + 7)  # floats; the last (12 MiB) is past the op's 1 MiB small-message path


def run_ranks(root: Path, nproc: int, broken_rank: int, port: Optional[int] = None, shm_mib: Optional[int] = None,
              sizes=SIZES):
    """Each rank's report of SCRIPT under torchrun, summing tensors of `sizes` floats; with `shm_mib`, in a mount
    namespace whose /dev/shm is a tmpfs of that size (a container's)."""
    script = root / "all_reduce_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [str(TORCHRUN), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
           str(port or free_ports(1)[0]), str(script), str(root), str(broken_rank), json.dumps(list(sizes))]
    if shm_mib is not None:
        cmd = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={shm_mib}m tmpfs /dev/shm && exec "$@"', "sh", *cmd]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def test_the_shared_memory_op_sums_every_size_alike_and_leaves_no_names(tmp_path):
    for out in run_ranks(tmp_path, 3, broken_rank=-1):
        assert out["on"] and out["op"], out["log"]
        assert any("shared-memory all-reduce is loaded" in line for line in out["log"]), out["log"]
        assert out["sums"] == [True] * 6
        assert out["left"] == []


def test_a_rank_that_cannot_build_it_turns_it_off_on_every_rank(tmp_path):
    ranks = run_ranks(tmp_path, 2, broken_rank=1)
    for out in ranks:
        assert not out["on"]
        assert any("all-reduces go over gloo" in line for line in out["log"]), out["log"]
        assert out["sums"] == [True] * 6
    assert "another rank cannot use it" in ranks[0]["log"][-1]
    assert "another rank" not in ranks[1]["log"][-1]


@pytest.mark.parametrize("local_world_size", ["1", None])
def test_ranks_on_other_hosts_keep_gloo(monkeypatch, local_world_size):
    """Without this check DeepSpeed's op would skip its set-up (LOCAL_SIZE short of the world) and segfault."""
    import deepspeed

    import ts_plugin.engines._cpu_tp as cpu_tp
    from ts_plugin.distributed import Ranks

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)

    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    monkeypatch.setattr(cpu_tp, "any_rank_failed", lambda failed: failed)
    log = []
    assert not cpu_tp.use_shared_memory_all_reduce(Ranks(0, 2, 0), log.append)
    assert "the ranks are not all on this host" in log[-1]


def test_the_op_loads_with_the_interpreters_own_ninja(monkeypatch):
    """Every process must build the op (and ts_plugin's CPU kernels) with the same ninja: with the system's in one
    process and the venv's in another (a TorchServe worker's PATH has the venv), each rebuilt what the other built
    (~30 s a time)."""
    import shutil

    from ts_plugin.engines._cpu_kernels import interpreter_tools_first

    ninja = Path(sys.executable).parent / "ninja"
    if not ninja.exists():
        pytest.skip("no ninja beside this interpreter")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as a script run without the venv on PATH
    with interpreter_tools_first():
        assert shutil.which("ninja") == str(ninja)
    assert os.environ["PATH"] == "/usr/bin:/bin"


def _can_mount() -> bool:
    return subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True).returncode == 0


def test_a_container_sized_dev_shm_falls_back_to_gloo_with_the_reason(tmp_path):
    """Docker and Kubernetes give 64 MiB; the op needs 66 MiB a rank. It maps what its write got, and the
    all-reduce of 64 MiB that follows crashed both ranks (SIGSEGV, seen on the old code)."""
    if not _can_mount():
        pytest.skip("mounting a tmpfs in a mount namespace needs root here")
    for out in run_ranks(tmp_path, 2, broken_rank=-1, shm_mib=64, sizes=SIZES + (16 * 2**20 + 7,)):
        assert not out["on"] and out["sums"] == [True] * 8, out
        assert "/dev/shm has 64 MiB free and the op needs 132 MiB" in " ".join(out["log"]), out["log"]


def test_a_segment_name_another_user_made_is_not_used(tmp_path):
    """shm.cpp opens an existing name as its own: a 0666 segment made in advance by another user would see
    every all-reduce."""
    port = free_ports(1)[0]
    planted = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_1")
    planted.write_bytes(b"")
    planted.chmod(0o666)
    try:
        os.chown(planted, 65534, 65534)
    except PermissionError:
        planted.unlink()
        pytest.skip("giving a file to another user needs root here")
    try:
        ranks = run_ranks(tmp_path, 2, broken_rank=-1, port=port)
        assert planted.exists() and planted.stat().st_uid == 65534  # left alone
    finally:
        planted.unlink(missing_ok=True)
    for out in ranks:
        assert not out["on"] and out["sums"] == [True] * 6, out
    assert "belongs to uid 65534" in ranks[1]["log"][-1], ranks[1]["log"]


def test_a_stale_build_lock_gives_up_on_the_op_in_bounded_time(tmp_path, monkeypatch):
    """torch waits for the op's build lock without a bound; one left by a worker killed mid-build hung every
    later worker."""
    import deepspeed
    from torch.utils.cpp_extension import _get_build_directory

    import ts_plugin.engines._cpu_tp as cpu_tp
    from ts_plugin.distributed import Ranks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    Path(_get_build_directory("deepspeed_shm_comm", verbose=False), "lock").write_text("")
    log = []
    started = time.monotonic()
    assert not cpu_tp.use_shared_memory_all_reduce(Ranks(0, 1, 0), log.append, lock_wait_s=1.0)
    assert time.monotonic() - started < 10
    assert "build lock" in log[-1] and "stayed for 1 s" in log[-1], log


@pytest.mark.serve
def test_a_stale_build_lock_leaves_a_tp_worker_that_loads_in_time_and_answers_exactly(tmp_path, monkeypatch):
    """Through the real TorchServe: a lock that outlasted startupTimeout made the frontend keep one rank's LOAD
    reply queued, and every request after it hung. The wait is a quarter of startupTimeout, then gloo."""
    from torch.utils.cpp_extension import _get_build_directory

    from _llm import PROMPTS, REPO, reference_text, tiny_llama_and_store
    from ts_plugin.testing import TorchServe, archive_model, java_available, write_config

    if not java_available():
        pytest.skip("TorchServe needs Java 11+")
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    # ts_plugin's own kernels come built, as scripts/bootstrap.sh leaves them: only DeepSpeed's op meets the lock
    subprocess.run([sys.executable, "-c", "from ts_plugin.engines._cpu_kernels import load_cpu_kernels as load; "
                    "raise SystemExit(bool(load()))"], check=True, timeout=600)
    Path(_get_build_directory("deepspeed_shm_comm", verbose=False), "lock").write_text("")
    model_dir, store = tiny_llama_and_store(tmp_path)
    config = write_config(tmp_path / "tp.yaml", REPO / "examples/tp/model-config.yaml", startupTimeout=40,
                          deviceType="cpu", handler={"max_new_tokens": 8})
    archive_model(store, "lock-tp", config, model_dir)
    with TorchServe(tmp_path / "ts", store, extra_env={"TORCH_EXTENSIONS_DIR": str(extensions)}) as ts:
        ts.start(models={"lock-tp": "lock-tp"})
        ts.wait_ready("lock-tp", timeout=120)
        for prompt in PROMPTS:
            answer = ts.predict("lock-tp", {"inputs": prompt, "parameters": {"max_new_tokens": 8}}, timeout=60)
            assert answer.status_code == 200 and answer.json()["generated_text"] == reference_text(model_dir, prompt, 8)
