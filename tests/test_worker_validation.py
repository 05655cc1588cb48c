"""A config that slips past packaging (plain torch-model-archiver) is refused at worker start with the
validator's message, instead of being served with TorchServe's silent defaults."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from _llm import REPO
from ts_plugin.testing import TorchServe, TorchServeError, java_available

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

# The frontend accepts this (a quoted number is ignored there); ts_plugin's rules refuse it.
CONFIG = 'minWorkers: 1\nmaxWorkers: 1\nmaxRetryTimeoutInSec: 5\nhandler:\n  max_new_tokens: "16"\n'


def test_worker_start_fails_with_the_validator_message(tmp_path):
    (tmp_path / "model-config.yaml").write_text(CONFIG)
    store = tmp_path / "store"
    store.mkdir()
    archiver = str(Path(sys.executable).parent / "torch-model-archiver")
    subprocess.run([archiver, "--model-name", "bad", "--version", "1.0", "--handler", str(REPO / "handlers/llm_handler.py"),
                    "--config-file", str(tmp_path / "model-config.yaml"), "--export-path", str(store),
                    "--archive-format", "no-archive"], check=True, capture_output=True)
    with TorchServe(tmp_path / "ts", store) as ts:
        ts.start()
        with pytest.raises(TorchServeError):
            ts.register("bad", "bad", timeout=60)
        deadline = time.time() + 30
        while "TSP110" not in ts.log_tail(400) and time.time() < deadline:
            time.sleep(1)
        log = ts.log_tail(400)
    assert "model-config.yaml:5:3: error TSP110 [handler.max_new_tokens]" in log, log
    assert "write 16 without quotes" in log
