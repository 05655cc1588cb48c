"""A failure on one rank alone inside a step (issue 29 item 2), through the real TorchServe: tp 2 on DeepSpeed's
shared-memory all-reduce and on gloo, and pptp 2x2. The failing rank's peers wait in a collective it will never
join, so it leaves the worker (distributed.leave_worker) and torchrun ends the others: the request gets a 5xx
at once, the worker restarts with no process of the old one left, and every answer after it is exact. Before,
the failing rank answered and took the next batch while its peers still waited: the next request hung."""
from __future__ import annotations

import time

import pytest

from _llm import PROMPTS, REPO, assert_gone, ranks_of, reference_text, serving_examples
from ts_plugin.testing import java_available

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

HANDLER = REPO / "tests/data/faults/rank_fails_handler.py"
MARKER = "FAIL-ON-RANK-1"
MODELS = {"rf-tp": "tp", "rf-tp-gloo": "tp", "rf-pptp": "pptp"}  # name -> example
AFTER = 20  # exact answers asked for after the failure


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_examples(tmp_path_factory.mktemp("rank-failure"), MODELS, str(HANDLER), batchSize=1, responseTimeout=30,
                          deviceType="cpu", handler={"max_new_tokens": 16}) as served:
        yield served


def _restarted(ts, name: str, old_pid: int, within: float = 180) -> float:
    """Seconds until `name` is READY with a worker other than `old_pid`."""
    started = time.monotonic()
    while time.monotonic() < started + within:
        try:
            pid = ts.worker_pid(name)
        except Exception:  # noqa: BLE001 - the management API answers again in a moment
            pid = None
        if pid not in (None, old_pid):
            return time.monotonic() - started
        time.sleep(0.3)
    raise AssertionError(f"{name} not READY with a new worker within {within} s\n" + ts.log_tail())


@pytest.mark.parametrize("name", list(MODELS))
def test_a_failure_on_one_rank_fails_its_request_fast_and_every_later_answer_is_exact(server, name):
    ts, model_dir = server
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 6}}
    expected = reference_text(model_dir, PROMPTS[0], 6)
    assert ts.predict(name, body).json()["generated_text"] == expected
    old_pid, old_ranks = ts.worker_pid(name), [proc for procs in ranks_of(ts, name).values() for proc in procs]
    sent = time.monotonic()
    failed = ts.predict(name, {"inputs": f"{MARKER} {PROMPTS[1]}", "parameters": {"max_new_tokens": 6}}, timeout=40)
    took = time.monotonic() - sent
    assert failed.status_code >= 500 and took < 10, (failed.status_code, failed.text[:200], f"{took:.1f} s")
    ready = _restarted(ts, name, old_pid)
    assert_gone(old_ranks)
    answers = [ts.predict(name, body, timeout=60) for _ in range(AFTER)]
    assert [(r.status_code, r.json().get("generated_text")) for r in answers] == [(200, expected)] * AFTER
    print(f"\n[rank failure] {name}: 5xx {took:.1f} s after it was sent; READY again {ready:.1f} s later")
