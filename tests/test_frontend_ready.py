"""A trivial handler packaged with `ts-plugin archive` reaches READY in the real TorchServe 0.12 and answers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests

from ts_plugin.testing import TorchServe, TorchServeError, java_available

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

ECHO_HANDLER = '''\
"""Echo the request body; {"stream": [...]} streams the parts back one chunk each."""
import json

from ts.handler_utils.utils import send_intermediate_predict_response


class EchoHandler:
    def __init__(self):
        self.initialized = False
        self.config = {}

    def initialize(self, context):
        self.config = context.model_yaml_config or {}
        self.initialized = True

    def handle(self, data, context):
        out = []
        for row in data:
            body = row.get("data") if row.get("data") is not None else row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = body.decode("utf-8")
            if isinstance(body, dict) and "stream" in body:
                for part in body["stream"][:-1]:
                    send_intermediate_predict_response([part], context.request_ids, "Intermediate", 200, context)
                out.append(body["stream"][-1])
                continue
            out.append(json.dumps({"echo": body, "responseTimeout": self.config.get("responseTimeout")}))
        return out
'''
CONFIG = "minWorkers: 1\nmaxWorkers: 1\nresponseTimeout: 60\nhandler:\n  greeting: hello\n"


@pytest.fixture(scope="module")
def model_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("echo")
    (root / "echo_handler.py").write_text(ECHO_HANDLER, encoding="utf-8")
    (root / "model-config.yaml").write_text(CONFIG, encoding="utf-8")
    store = root / "store"
    store.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "ts_plugin", "archive", "--model-name", "echo", "--version", "1.0",
         "--handler", "echo_handler.py", "--config-file", "model-config.yaml", "--export-path", str(store)],
        cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""  # the validator has nothing to say about this config
    assert (store / "echo.mar").is_file()
    return store


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    with TorchServe(tmp_path_factory.mktemp("ts"), model_store) as ts:
        ts.start(models={"echo": "echo.mar"})
        yield ts


def test_reaches_ready_with_the_yaml_settings(server):
    server.wait_ready("echo", timeout=60)
    [version] = server.describe("echo")
    assert [w["status"] for w in version["workers"]] == ["READY"]
    assert (version["minWorkers"], version["maxWorkers"], version["responseTimeout"]) == (1, 1, 60)
    ping = requests.get(f"{server.inference_url}/ping", timeout=10)
    assert (ping.status_code, ping.json()["status"]) == (200, "Healthy")


@pytest.mark.parametrize("body, echoed", [
    ("hello", "hello"),
    (b"raw bytes", "raw bytes"),
    ({"inputs": "hi", "n": 2}, {"inputs": "hi", "n": 2}),
], ids=["str", "bytes", "json"])
def test_answers(server, body, echoed):
    response = server.predict("echo", body, timeout=60)
    assert response.status_code == 200, response.text
    # the handler sees the whole model-config.yaml as context.model_yaml_config
    assert response.json() == {"echo": echoed, "responseTimeout": 60}


def test_stream_chunks(server):
    assert server.stream_chunks("echo", {"stream": ["a", "b", "c"]}, timeout=60) == [b"a", b"b", b"c"]


def test_register_synchronously(server):
    answer = server.register("echo.mar", "echo2", timeout=120)
    assert "echo2" in answer["status"]
    server.wait_ready("echo2", timeout=60)
    assert server.predict("echo2", "again").json()["echo"] == "again"


def test_register_failure_raises_with_log_tail(server):
    with pytest.raises(TorchServeError) as error:
        server.register("no-such-archive.mar", "ghost", timeout=60)
    assert "ghost" in str(error.value) and "ts_log.log" in str(error.value)


def test_token_auth_and_clean_stop(model_store, tmp_path):
    ts = TorchServe(tmp_path / "ts", model_store, token_auth=True)
    with ts:
        ts.start(models={"echo": "echo.mar"})
        keys = json.loads((tmp_path / "ts" / "key_file.json").read_text())
        assert ts.key == keys["inference"]["key"] and ts.management_key == keys["management"]["key"]

        ok = ts.predict("echo", "with key", timeout=60)
        assert (ok.status_code, ok.json()["echo"]) == (200, "with key")
        url = f"{ts.inference_url}/predictions/echo"
        assert requests.post(url, data=b"no key", timeout=30).status_code in (400, 401)
        wrong = {"Authorization": "Bearer not-the-key"}
        assert requests.post(url, data=b"wrong key", headers=wrong, timeout=30).status_code in (400, 401)
        models = f"{ts.management_url}/models"
        assert requests.get(models, timeout=30).status_code in (400, 401)
        inference_key = {"Authorization": f"Bearer {ts.key}"}
        assert requests.get(models, headers=inference_key, timeout=30).status_code in (400, 401)
        assert ts.describe("echo")[0]["workers"][0]["status"] == "READY"  # with the management key

        frontend = psutil.Process(ts.process.pid).children(recursive=True)
        worker_pids = [w["pid"] for w in ts.describe("echo")[0]["workers"]]
        assert frontend and worker_pids
    assert ts.process is None
    assert not (tmp_path / "ts" / "tmp" / ".model_server.pid").exists()
    for proc in frontend:
        assert not _alive(proc.pid), proc
    for pid in worker_pids:
        assert not _alive(pid), pid


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
