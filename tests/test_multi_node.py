"""A model across nodes (issue 30), two "nodes" on one host through the real TorchServe: the frontend's torchrun
with `nnodes: 2` and `ts-plugin join` as the second agent, on loopback, meeting in torchrun's c10d rendezvous."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from _llm import (PROMPTS, REPO, assert_gone, greedy_bodies, predict_concurrently, reference_text, stream_interrupted,
                  stream_text)
from ts_plugin.join import JoinError, plan_join
from ts_plugin.testing import TorchServe, archive_model, free_ports, java_available, make_tiny_model, write_config

LAYOUTS = {"pp": 1, "tp": 1, "pptp": 2}  # parallelType -> nproc-per-node on each of the 2 nodes


def _config(root: Path, ptype: str, nnodes: int = 2) -> Path:
    extra = {"pippy": {"chunks": 1}} if ptype == "pp" else {}
    return write_config(root / f"{ptype}.yaml", REPO / f"examples/{ptype}/model-config.yaml", startupTimeout=300,
                        continuousBatching=True, batchSize=4, responseTimeout=30,
                        torchrun={"nnodes": nnodes, "nproc-per-node": LAYOUTS[ptype], "rdzv-backend": "ts-plugin"},
                        handler={"max_new_tokens": 120, "max_length": 256}, **extra)


# --- the plan, without a server ----------------------------------------------------------------------------------

def test_plan_joins_the_frontends_rendezvous(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", arch="llama")
    archive_model(tmp_path / "store", "llama-pp", _config(tmp_path, "pp"), model_dir)
    plan = plan_join(tmp_path / "store" / "llama-pp", tmp_path / "work", "llama-pp_29600")
    command = " ".join(plan.command)
    assert "--nnodes 2 --nproc-per-node 1 --rdzv-backend ts-plugin" in command and "--rdzv-id llama-pp_29600" in command
    endpoint = plan.command[plan.command.index("--rdzv-endpoint") + 1]
    assert endpoint.startswith("localhost:") and endpoint == _yaml_endpoint(tmp_path / "pp.yaml")
    assert plan.env["TS_PLUGIN_JOINED"] == "1" and plan.command[-2:] == ["ts_plugin._joined_rank", str(plan.model_dir)]
    elsewhere = plan_join(tmp_path / "store" / "llama-pp", tmp_path / "work", "x_1", "10.0.0.1:29411")
    assert "10.0.0.1:29411" in elsewhere.command


def test_a_single_node_archive_has_nothing_to_join(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", arch="llama")
    archive_model(tmp_path / "store", "one", _config(tmp_path, "pp", nnodes=1), model_dir)
    with pytest.raises(JoinError, match="nnodes 1"):
        plan_join(tmp_path / "store" / "one", tmp_path / "work", "one_29500")


def test_the_frontends_rendezvous_ends_its_wait_naming_who_came_and_the_join_command(monkeypatch):
    """rdzv-backend ts-plugin, as torchrun finds it (the entry point), with 2 of 3 nodes: the frontend's gives up
    after join_timeout, and says who came and what the missing node runs."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters, RendezvousTimeoutError
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    endpoint = f"localhost:{free_ports(1)[0]}"

    def handler(joined: bool, **conf):
        monkeypatch.setenv("TS_PLUGIN_JOINED", "1" if joined else "0")
        return get_rendezvous_handler(RendezvousParameters("ts-plugin", endpoint, "llama-pp_29500", 3, 3, **conf))

    frontend = handler(joined=False, join_timeout=6)
    other = handler(joined=True, join_timeout=12)  # still there when the frontend's gives up
    with ThreadPoolExecutor(1) as pool:
        other_waits = pool.submit(other.next_rendezvous)
        started = time.monotonic()
        with pytest.raises(RendezvousTimeoutError) as error:
            frontend.next_rendezvous()
        with pytest.raises(RendezvousTimeoutError):
            other_waits.result()
    assert time.monotonic() - started < 30
    message = str(error.value)
    assert re.search(rf"rendezvous 'llama-pp_29500' at {endpoint}: after \d+ s, 2 of the 3 nodes had joined "
                     r"\(this host, ", message), message
    assert f"1 never came. On each missing node run `ts-plugin join llama-pp.mar --rdzv-id llama-pp_29500 " \
           f"--rdzv-endpoint {endpoint}`" in message


def _yaml_endpoint(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["torchrun"]["rdzv-endpoint"]


# --- served --------------------------------------------------------------------------------------------------------

needs_java = pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-node")
    store = root / "store"
    model_dir = make_tiny_model(root / "model", arch="llama")
    for ptype in LAYOUTS:
        archive_model(store, f"across-{ptype}", _config(root, ptype), model_dir)
    with TorchServe(root / "ts", store) as ts:
        ts.start()
        yield ts, store, model_dir, root


class Joined:
    """`ts-plugin join` as the second node, in a session of its own."""

    def __init__(self, ts: TorchServe, archive: Path, log: Path, rounds=None, rdzv_id=None):
        args = ["--rounds", str(rounds)] if rounds else []
        args += ["--rdzv-id", rdzv_id] if rdzv_id else ["--management-address", ts.management_url]
        self.process = subprocess.Popen([sys.executable, "-m", "ts_plugin", "join", str(archive), *args],
                                        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def ranks(self):
        return [proc for proc in psutil.Process(self.process.pid).children(recursive=True)
                if "ts_plugin._joined_rank" in proc.cmdline() and "torch.distributed.run" not in proc.cmdline()]

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)


def _register(ts: TorchServe, name: str, joined_first: bool, store: Path, log: Path, rounds=None) -> Joined:
    """Register `name` with its second node joining before the frontend's torchrun starts (the server's first
    torchrun worker: its id is initial_distribution_port) or after (asking the management API for the id)."""
    joined = None
    if joined_first:
        registered = requests.get(f"{ts.management_url}/models", headers=ts._headers(management=True)).json()
        assert not registered["models"], "joining first needs the server's first worker"
        joined = Joined(ts, store / name, log, rounds, rdzv_id=f"{name}_{ts.distribution_port}")
        time.sleep(5)  # its agent is the first in the rendezvous: torchrun gives its node rank 0
    registering = threading.Thread(target=ts.register, args=(name, name), kwargs={"timeout": 400})
    registering.start()
    if not joined_first:
        joined = Joined(ts, store / name, log, rounds)
    registering.join()
    ts.wait_ready(name)
    return joined


@pytest.mark.serve
@needs_java
@pytest.mark.parametrize("ptype, joined_first", [("tp", True), ("pp", False), ("pptp", False)])
def test_greedy_answers_across_two_nodes_equal_generate_and_unregister_ends_the_join(server, ptype, joined_first):
    ts, store, model_dir, root = server
    name = f"across-{ptype}"
    joined = _register(ts, name, joined_first, store, root / f"join-{ptype}.log", rounds=1)
    try:
        lengths = [20, 7, 13]
        responses = predict_concurrently(ts, name, greedy_bodies(lengths))
        for prompt, n, response in zip(PROMPTS, lengths, responses):
            assert response.status_code == 200, response.text
            assert response.json()["generated_text"] == reference_text(model_dir, prompt, n)
        ts.unregister(name)
        # the frontend's worker is gone: the joined ranks end, then torchrun (its code depends on whether the
        # frontend's agent, which hosts the rendezvous store, left first), and the join's one round with it
        joined.process.wait(60)
    finally:
        joined.stop()


@pytest.mark.serve
@needs_java
@pytest.mark.parametrize("in_flight", [False, True])
def test_a_lost_node_fails_fast_and_the_model_serves_exact_answers_once_it_rejoins(server, in_flight):
    ts, store, model_dir, root = server
    name = "across-pp"
    joined = _register(ts, name, False, store, root / f"join-lost-{in_flight}.log")
    try:
        body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 20}}
        expected = reference_text(model_dir, PROMPTS[0], 20)
        old_worker, old_ranks = ts.worker_pid(name), joined.ranks()
        assert old_ranks
        if in_flight:
            # one request streams and one waits for its whole answer, both running when the node goes
            with ThreadPoolExecutor(1) as pool:
                whole = pool.submit(_timed_predict, ts, name,
                                    {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 120}})
                stream = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 120}}
                received, cut, took = stream_interrupted(ts, name, stream, lambda: [rank.kill() for rank in old_ranks])
                whole_answer, whole_took = whole.result()
            # the stream must not pass for whole: it ends early, cut or short
            assert cut or stream_text(received) != reference_text(model_dir, PROMPTS[2], 120)
            assert took < 30
            # the other fails too, soon: under continuous batching its response began with the first step's empty
            # chunk, so TorchServe can only drop the connection (None), as for a rank lost on one node
            assert whole_answer is None or whole_answer.status_code >= 500, whole_answer.text
            assert whole_took < 30
        else:
            for rank in old_ranks:
                rank.kill()
        assert_gone(old_ranks)
        deadline = time.monotonic() + 120
        answer = None
        while time.monotonic() < deadline:  # the join starts torchrun again and meets the frontend's new worker
            if ts.worker_pid(name) not in (None, old_worker) and joined.ranks():
                answer = ts.predict(name, body)
                if answer.status_code == 200:
                    break
            time.sleep(2)
        assert answer is not None and answer.status_code == 200, answer and answer.text
        assert answer.json()["generated_text"] == expected
        print(f"\n[multi-node] node lost {'in flight' if in_flight else 'idle'}: serving again after "
              f"{time.monotonic() - deadline + 120:.1f} s")
    finally:
        ts.unregister(name)
        joined.stop()


def _timed_predict(ts: TorchServe, name: str, body: dict):
    """(the response, or None where the connection was dropped; seconds it took)."""
    started = time.monotonic()
    try:
        answer = ts.predict(name, body)
    except requests.RequestException:
        answer = None
    return answer, time.monotonic() - started


@pytest.mark.serve
@needs_java
def test_a_node_that_never_joins_fails_the_registration_naming_it(server):
    """The frontend's torchrun (rdzv-backend ts-plugin) stops waiting within TorchServe's fixed 2-minute limit on a
    worker's start, and its error, in model_log.log, says how many nodes came and how the others join."""
    ts, _, _, root = server
    started = time.monotonic()
    with pytest.raises(Exception, match="Failed to start workers"):
        ts.register("across-pp", "across-pp", timeout=300)
    took = time.monotonic() - started
    assert took < 115, f"{took:.0f} s: TorchServe's own 2-minute limit, not the rendezvous's, ended it"
    log = (ts.log_dir / "model_log.log").read_text(errors="replace")
    endpoint = re.escape(_yaml_endpoint(root / "pp.yaml"))
    assert re.search(rf"rendezvous '(across-pp_\d+)' at {endpoint}: after \d+ s, 1 of the 2 nodes had joined "
                     rf"\(this host\); 1 never came\. On each missing node run `ts-plugin join across-pp\.mar "
                     rf"--rdzv-id \1 --rdzv-endpoint {endpoint}`", log), ts.log_tail()
    print(f"\n[multi-node] no second node: registration failed after {took:.0f} s")
