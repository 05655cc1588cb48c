"""A rank that stops instead of dying (issue 29 item 3), through the real TorchServe: SIGSTOP on tp's rank 1 and on
pp's last stage, idle and with a stream in flight, under responseTimeout 30. Every step waits in a collective or a
pipeline receive that the stopped rank never joins, so no reply reaches the frontend, which after responseTimeout
kills the worker's torchrun; every rank dies with its agent (PR_SET_PDEATHSIG SIGKILL, which reaches a stopped
process too). Expected: an error within 45 s, a new worker, no process of the old one left, an exact next answer.
A rank that stops while no request comes is found by the ranks' own watch (distributed.watch_peers): the worker
restarts by itself."""
from __future__ import annotations

import os
import signal
import time

import pytest

from _llm import (PROMPTS, REPO, assert_gone, ranks_of, reference_text, serving_examples, stream_interrupted,
                  stream_text)
from test_rank_failure import _restarted
from ts_plugin.distributed import WATCH_INTERVAL_S
from ts_plugin.testing import java_available

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

HANDLER = str(REPO / "tests/data/faults/slow_steps_handler.py")  # 0.25 s a step: a stream is in flight for long
MODELS = {"hang-tp": "tp", "hang-pp": "pp"}  # name -> example
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_examples(tmp_path_factory.mktemp("hung-rank"), MODELS, HANDLER, batchSize=1, responseTimeout=TIMEOUT_S,
                          deviceType="cpu", continuousBatching=False, handler={"max_new_tokens": 60}) as served:
        yield served


@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "in-flight"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_stopped_rank_fails_the_request_within_45_s_and_the_worker_comes_back_exact(server, name, in_flight):
    ts, model_dir = server
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}
    expected = reference_text(model_dir, PROMPTS[0], 4)
    assert ts.predict(name, body).json()["generated_text"] == expected
    old_pid, ranks = ts.worker_pid(name), ranks_of(ts, name)
    old = [proc for procs in ranks.values() for proc in procs]
    stopped = ranks[max(ranks)][0]  # tp's rank 1, pp's last stage
    if in_flight:
        stream = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 60}}
        received, cut, took = stream_interrupted(ts, name, stream, lambda: os.kill(stopped.pid, signal.SIGSTOP))
        # the stream must not pass for whole: it ends early, cut or short
        assert cut or stream_text(received) != reference_text(model_dir, PROMPTS[2], 60)
    else:
        os.kill(stopped.pid, signal.SIGSTOP)
        sent = time.monotonic()
        failed = ts.predict(name, body, timeout=120)
        took = time.monotonic() - sent
        assert failed.status_code >= 500, failed.text
    assert took < 45, f"{took:.1f} s"
    ready = _restarted(ts, name, old_pid)
    assert_gone(old)
    assert ts.predict(name, body).json()["generated_text"] == expected
    print(f"\n[hung rank] {name} {'in flight' if in_flight else 'idle'}: error {took:.1f} s after SIGSTOP; "
          f"READY again {ready:.1f} s later")


@pytest.mark.parametrize("name", list(MODELS))
def test_a_rank_stopped_while_no_request_comes_restarts_the_worker_by_itself(server, name):
    ts, model_dir = server
    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 4}}
    expected = reference_text(model_dir, PROMPTS[1], 4)
    assert ts.predict(name, body).json()["generated_text"] == expected
    old_pid, ranks = ts.worker_pid(name), ranks_of(ts, name)
    old = [proc for procs in ranks.values() for proc in procs]
    os.kill(ranks[max(ranks)][0].pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    _restarted(ts, name, old_pid, within=TIMEOUT_S + WATCH_INTERVAL_S + 90)
    took = time.monotonic() - stopped_at
    assert_gone(old)
    assert ts.predict(name, body).json()["generated_text"] == expected
    # found within one watch interval and the barrier's timeout (responseTimeout), then a restart
    assert took < TIMEOUT_S + WATCH_INTERVAL_S + 30, f"{took:.1f} s"
    print(f"\n[hung rank] {name} stopped while idle: READY with a new worker {took:.1f} s later")
