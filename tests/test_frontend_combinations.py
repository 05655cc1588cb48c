"""What the real TorchServe 0.12 frontend does with the continuousBatching combinations that the validator refuses
or warns about (TSP213 asyncCommunication, TSP214 sequenceBatching, TSP215 batchSize 1), next to the control
(continuousBatching with batchSize 2) that works.

The handler is a plain TorchServe handler, not ts_plugin's (which refuse these configs in the worker):
tests/data/frontend_combinations/stream_handler.py streams {"name": "a", "pieces": n} as n pieces "a0 ", "a1 ", ...,
one per `handle` call ("decode step" of handler.step_s), keeps the per-request state by request id and logs every
call (request ids, whether each came with its body, the sequence headers) to a JSON-lines file. One TorchServe
serves the whole module; each test registers its model, so only one Python worker runs at a time."""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from ts_plugin.testing import TorchServe, java_available

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

HANDLER = Path(__file__).parent / "data" / "frontend_combinations" / "stream_handler.py"
STEP = 0.2  # seconds per handle call
COMMON = {"minWorkers": 1, "maxWorkers": 1, "responseTimeout": 30, "maxBatchDelay": 100, "continuousBatching": True}
MODELS = {
    "cb_batch2": {"batchSize": 2},  # the control
    "cb_batch1": {"batchSize": 1},  # TSP215
    "cb_async": {"batchSize": 2, "asyncCommunication": True, "step_s": 0.05},  # TSP213
    "cb_sequence": {"batchSize": 2, "sequenceBatching": True},  # TSP214, without sequenceMaxIdleMSec
    "cb_sequence_idle": {"batchSize": 2, "sequenceBatching": True, "sequenceMaxIdleMSec": 1000,
                         "maxNumSequence": 4},  # TSP214, as the sequence examples configure it
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("combinations")
    shutil.copy(HANDLER, root / HANDLER.name)
    store = root / "store"
    store.mkdir()
    for name, settings in MODELS.items():
        settings = dict(settings)
        step = settings.pop("step_s", STEP)
        config = {**COMMON, **settings, "handler": {"step_s": step, "events": str(root / f"{name}.jsonl")}}
        (root / f"{name}.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        result = subprocess.run(
            [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
             "--handler", HANDLER.name, "--config-file", f"{name}.yaml", "--archive-format", "no-archive",
             "--export-path", str(store)],
            cwd=root, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    return root


@pytest.fixture(scope="module")
def server(work, tmp_path_factory):
    with TorchServe(tmp_path_factory.mktemp("ts"), work / "store") as ts:
        ts.start()
        yield ts


@pytest.fixture
def own_server(work, tmp_path_factory):
    """A frontend of its own: after the sequence models ran in the shared one, the async worker often never got
    its first request (3 runs in 7 here, and once in CI); on a fresh frontend about once in 25."""
    with TorchServe(tmp_path_factory.mktemp("ts"), work / "store") as ts:
        ts.start()
        yield ts


class Served:
    """One model registered for one test (unregistered after it), with its handler's call log."""

    def __init__(self, server: TorchServe, work: Path, name: str):
        self.server, self.name, self.events_path = server, name, work / f"{name}.jsonl"

    def __enter__(self) -> "Served":
        self.events_path.unlink(missing_ok=True)
        log = self.server.log_dir / "ts_log.log"
        self.log_start = log.stat().st_size if log.exists() else 0
        self.server.register(self.name, self.name, timeout=120)
        return self

    def __exit__(self, *exc) -> None:
        self.server.unregister(self.name, timeout=60)

    def calls(self) -> list:
        if not self.events_path.exists():
            return []
        records = [json.loads(line) for line in self.events_path.read_text(encoding="utf-8").splitlines()]
        return [record for record in records if "rows" in record]  # the ends of the calls

    def wait_begun(self, name: str, timeout: float) -> None:
        """Wait until the handler has started a call with request `name`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.events_path.exists():
                for line in self.events_path.read_text(encoding="utf-8").splitlines():
                    if name in json.loads(line).get("begin", []):
                        return
            time.sleep(0.01)
        raise AssertionError(f"the handler never started {name}")

    def run(self, specs, timeout: float = 20) -> dict:
        """Send streaming requests concurrently and return what each client received. A spec is
        (name, pieces, after): after is None (at once), the name of a request whose first piece the client
        waits for, or "begin:<name>": wait until the handler has started that request."""
        results: dict = {}
        first_piece = {name: threading.Event() for name, _, _ in specs}
        start = time.monotonic()

        def client(name: str, pieces: int, after) -> None:
            if after is not None and after.startswith("begin:"):
                self.wait_begun(after[len("begin:"):], timeout)
            elif after is not None:
                assert first_piece[after].wait(timeout), f"{after} sent nothing"
            sent = time.monotonic()
            result = results[name] = {"sent": sent - start, "status": None, "chunks": [], "times": [], "error": None}
            try:
                with requests.post(f"{self.server.inference_url}/predictions/{self.name}",
                                   json={"name": name, "pieces": pieces}, stream=True, timeout=timeout) as response:
                    result["status"] = response.status_code
                    for chunk in response.iter_content(chunk_size=None):
                        if chunk:
                            result["chunks"].append(chunk.decode("utf-8"))
                            result["times"].append(time.monotonic() - start)
                            first_piece[name].set()
            except requests.RequestException as err:
                result["error"] = repr(err)
            finally:
                first_piece[name].set()
                result["done"] = time.monotonic() - start

        threads = [threading.Thread(target=client, args=spec) for spec in specs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(2 * timeout + 10)
        assert not any(thread.is_alive() for thread in threads), "a client hung"
        return results

    def ts_log(self, *waited_for: str, timeout: float = 20) -> str:
        """The frontend's log since this model was registered, once it holds every line in `waited_for` (log4j
        writes it a little later)."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.server.log_dir / "ts_log.log", "rb") as file:
                file.seek(self.log_start)
                log = file.read().decode("utf-8", errors="replace")
            if all(line in log for line in waited_for) or time.monotonic() > deadline:
                return log
            time.sleep(0.2)


def pieces(name: str, n: int) -> list:
    return [f"{name}{i} " for i in range(n)]


def names_per_call(calls: list) -> list:
    return [[row["name"] for row in call["rows"]] for call in calls]


def run_three(server, work, model: str):
    """a (5 pieces) at once, then b (5) and c (3) once a has sent a piece; each must get all its pieces."""
    with Served(server, work, model) as served:
        got = served.run([("a", 5, None), ("b", 5, "a"), ("c", 3, "a")])
        calls = served.calls()
    for name, n in (("a", 5), ("b", 5), ("c", 3)):
        assert (got[name]["status"], got[name]["chunks"], got[name]["error"]) == (200, pieces(name, n), None)
    return got, calls


def test_control_batch2_new_requests_join_the_running_batch(server, work):
    got, calls = run_three(server, work, "cb_batch2")
    rows = [row for call in calls for row in call["rows"]]
    assert len(rows) == 13  # one row per piece: each request is sent once with its body, then re-sent without
    assert sorted(row["name"] for row in rows if row["body"]) == ["a", "b", "c"]
    assert max(len(call["rows"]) for call in calls) == 2  # never more than batchSize
    # a late request joins a running one at the next step: its fresh row next to a's body-less row
    assert any(len(call["rows"]) == 2 and any(row["fresh"] for row in call["rows"])
               and any(not row["body"] for row in call["rows"]) for call in calls)
    # the third request waited for a free slot: its first piece comes after one of the others ended
    first, second = sorted(("b", "c"), key=lambda name: got[name]["times"][0])
    assert got[second]["times"][0] > min(got["a"]["times"][-1], got[first]["times"][-1]) - 0.05
    assert got[first]["times"][0] < got["a"]["times"][-1]  # the first of them ran next to a
    assert len(calls) < 13  # fewer steps than pieces: batching happened


def test_batch1_one_request_at_a_time(server, work):
    """TSP215: with batchSize 1 continuousBatching never puts two requests in one call."""
    got, calls = run_three(server, work, "cb_batch1")
    assert [len(call["rows"]) for call in calls] == [1] * 13  # one step per piece
    # the streams do not overlap: each starts after the one before it ended
    ordered = sorted(got.values(), key=lambda result: result["times"][0])
    for before, after in zip(ordered, ordered[1:]):
        assert after["times"][0] > before["times"][-1]
    # the calls run request after request: a, then the one of b and c that got the slot, then the other
    runs = [(name, len(list(group))) for name, group in itertools.groupby(row for [row] in names_per_call(calls))]
    assert runs in ([("a", 5), ("b", 5), ("c", 3)], [("a", 5), ("c", 3), ("b", 5)])
    assert ordered[-1]["done"] >= 12 * STEP  # the last client waited for both others


def test_sequence_without_idle_timeout_fails_every_request(server, work):
    """TSP214: sequenceBatching without sequenceMaxIdleMSec: the frontend never creates its job-group
    structures, every request is a 500 NullPointerException and the handler is never called."""
    with Served(server, work, "cb_sequence") as served:
        got = served.run([("a", 3, None), ("b", 3, None)])
        calls, log = served.calls(), served.ts_log()
    for result in got.values():
        assert result["status"] == 500
        answer = json.loads("".join(result["chunks"]))
        assert answer["type"] == "NullPointerException" and "jobGroupLock" in answer["message"]
    assert calls == []
    assert "due to exception" in log and '"this.jobGroupLock" is null' in log


def test_sequence_batches_twice_batch_size_one_sequence_per_request(server, work):
    """TSP214: with sequenceBatching the frontend uses SequenceContinuousBatching: each request without a
    sequence id becomes a sequence of its own (ts-seq-<uuid>, ts_request_sequence_start on every step), a
    batch holds up to 2 x batchSize rows, and a request beyond maxNumSequence live sequences is refused
    at once with 503 (the sequences live on sequenceMaxIdleMSec after their last answer)."""
    with Served(server, work, "cb_sequence_idle") as served:
        got = served.run([("a", 6, None), ("b", 5, "a"), ("c", 3, "a"), ("d", 3, "a"), ("e", 3, "a")])
        calls, log = served.calls(), served.ts_log()
    refused = [name for name, result in got.items() if result["status"] == 503]
    assert len(refused) == 1 and refused[0] in "bcde"  # the fifth concurrent sequence (maxNumSequence 4)
    for name, n in (("a", 6), ("b", 5), ("c", 3), ("d", 3), ("e", 3)):
        if name not in refused:
            assert (got[name]["status"], got[name]["chunks"]) == (200, pieces(name, n))
    assert "has no worker to serve inference request" in "".join(got[refused[0]]["chunks"])
    assert "exceeding maxNumSequence: 4" in log
    assert max(len(call["rows"]) for call in calls) == 4  # 2 x batchSize, not batchSize
    rows = [row for call in calls for row in call["rows"]]
    sequences = {row["name"]: row["seq"] for row in rows}
    assert all(seq.startswith("ts-seq-") for seq in sequences.values()) and len(set(sequences.values())) == 4
    assert all(row["seq_start"] == "true" for row in rows)  # also on the body-less continuation steps


def test_async_resends_running_requests_and_kills_the_worker(own_server, work):
    """TSP213: with asyncCommunication the AsyncWorkerThread loops on ContinuousBatching.getRequest without
    waiting for answers, so a running request is sent again and again, in parallel copies (with its body
    until its first answer marks it cached in the backend); the client's pieces come from those copies,
    not from steps; the first answer after its last piece hits "Unexpected job in sendResponse()", the
    frontend closes the worker's channel, and the other request in flight fails with 500 "Worker died." or, in
    some runs, is never answered at all (the frontend drops it with the worker; its client times out)."""
    for _attempt in range(2):
        with Served(own_server, work, "cb_async") as served:
            got = served.run([("a", 3, None), ("b", 1000, "begin:a")], timeout=15)
            calls, log = served.calls(), served.ts_log("Worker disconnected", "Retry worker")
        if "b" in got:
            break
        # about once in 25 runs the async worker never starts a (so b is never sent): broken too, but not the
        # failure this test documents; a fresh worker gets one more try
        assert got["a"]["status"] != 200 or got["a"]["chunks"] != pieces("a", 3), got["a"]
    assert "b" in got, f"the handler never started a, twice: {got['a']}"
    a_calls = [call for call in calls if any(row["name"] == "a" for row in call["rows"])]
    a_rows = [row for call in a_calls for row in call["rows"] if row["name"] == "a"]
    assert len({row["id"] for row in a_rows}) == 1  # one request id ...
    assert sum(row["body"] for row in a_rows) > 3  # ... sent with its body more often than it has pieces
    # ... while an earlier copy was still in the handler: the frontend did not wait for the answer
    assert any(later["t"] < earlier["t_end"] for earlier, later in zip(a_calls, a_calls[1:]))
    assert got["a"]["status"] == 200 and sorted(got["a"]["chunks"]) == pieces("a", 3)
    if got["b"]["status"] is None:  # the frontend lost it with the worker: its client waits until it gives up
        assert "ReadTimeout" in got["b"]["error"], got["b"]
    else:
        assert got["b"]["status"] == 500 and json.loads("".join(got["b"]["chunks"]))["message"] == "Worker died."
    assert "Unexpected job in sendResponse() with 200 status code: " + a_rows[0]["id"] in log
    assert "Worker disconnected" in log and "Retry worker" in log
