"""tests/gpu/check.sh runs on a lent GPU machine only; its --dry-run takes the same steps on the CPU, so the
script cannot rot between the sessions that have a GPU."""
import os
import subprocess
from pathlib import Path

import pytest

from ts_plugin.testing import java_available

SCRIPT = Path(__file__).resolve().parent / "gpu" / "check.sh"


@pytest.mark.serve
@pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")
def test_gpu_check_dry_run_serves_every_type_and_compares(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=320,
                            env={**os.environ, "CHECK_WORKDIR": str(tmp_path)})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for name in ("tp", "pp", "custom"):
        assert f"gpu check: {name}: same as single-process torch.float32 generate: True" in result.stdout


def test_gpu_check_without_a_gpu_says_so():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device" in result.stderr
