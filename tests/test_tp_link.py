"""The socket link the tp engine all-reduces over on CPU with 2 ranks (`_RankPair`), under real torchrun + gloo:
sums and broadcasts of every size (far beyond the socket buffers, where sending before receiving on both ranks
would block forever), with and without the busy-wait, and a timeout when the other rank never answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_pipeline_engine import free_port

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"

SCRIPT = textwrap.dedent(r'''
    import json, os, sys, time
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from ts_plugin.engines.deepspeed import _RankPair

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), {}
    for spin_s in (0.0, 0.002):
        pair = _RankPair(timeout_s=20, spin_s=spin_s)
        sums = []
        for size in (1, 1024, 3 * 2**20 + 7):  # the last: 12 MiB each way
            parts = [torch.arange(size, dtype=torch.float32) * (r + 1) + 0.1 * r for r in (0, 1)]
            expected = parts[0] + parts[1]
            sums.append(torch.equal(pair.all_reduce(parts[rank].clone()), expected))
        tokens = torch.tensor([[7, 8, 9]]) if rank == 0 else torch.zeros(1, 3, dtype=torch.int64)
        out[f"spin {spin_s}"] = {"sums": sums, "broadcast": pair.broadcast(tokens).tolist()}
        pair.conn.close()
    pair = _RankPair(timeout_s=1, spin_s=0.002)
    if rank == 0:  # rank 1 never answers: a timeout, then every later call refuses at once
        started = time.monotonic()
        errors = []
        for _ in range(2):
            try:
                pair.all_reduce(torch.ones(4))
            except RuntimeError as error:
                errors.append(str(error))
        out["timeout"] = {"errors": errors, "seconds": time.monotonic() - started}
    dist.barrier()
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(out))
    os._exit(0)
''')


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-link")
    script = root / "link_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(script), str(root)]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return [json.loads((root / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("spin", ["spin 0.0", "spin 0.002"])
def test_all_reduce_and_broadcast_of_any_size(ranks, spin):
    for out in ranks:
        assert out[spin]["sums"] == [True, True, True]
        assert out[spin]["broadcast"] == [[7, 8, 9]]


def test_a_silent_rank_times_out_and_the_link_stays_failed(ranks):
    errors = ranks[0]["timeout"]["errors"]
    assert len(errors) == 2
    assert "all-reduce with the other tensor-parallel rank failed" in errors[0] and "1 s" in errors[0]
    assert "failed earlier" in errors[1] and "must be restarted" in errors[1]
    assert 0.9 <= ranks[0]["timeout"]["seconds"] < 10


@pytest.mark.parametrize("policy, cpus, spins", [("", {0, 1}, True), ("PASSIVE", {0, 1}, False),
                                                 ("active", {0, 1}, True), ("", {0}, False)])
def test_the_busy_wait_follows_omp_wait_policy_and_the_cpus(monkeypatch, policy, cpus, spins):
    import ts_plugin.engines.deepspeed as engine

    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: cpus)
    monkeypatch.setattr(engine.dist, "get_world_size", lambda group=None: 2)
    assert engine._spin_seconds() == (engine._SPIN_S if spins else 0.0)
