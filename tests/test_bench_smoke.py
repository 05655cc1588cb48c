"""The benchmark (`make bench`, bench/run.py) in its smoke mode: a tiny model, one repetition, through the real
TorchServe and the in-process drivers; it must finish and write the table with every figure's row."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ts_plugin.testing import java_available

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

REPO = Path(__file__).resolve().parents[1]


def test_smoke_benchmark_writes_every_figure(tmp_path):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.report import FIGURE_ROWS

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(out),
                             "--workdir", str(tmp_path / "work")],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    markdown = (out / "benchmarks.md").read_text()
    assert "| figure | target | measured (median) | min - max | n | result |" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    for label in FIGURE_ROWS:
        rows = [line for line in table if line.startswith(f"| {label} ")]
        assert rows, f"no table row for {label!r}"
        assert "n/a" not in rows[0], rows[0]
    # the parity rows: every parallelType answers like single-process generate, even on the tiny model
    for line in table:
        if line.startswith("| 1. Parity"):
            assert "| 100% |" in line, line
    assert (out / "benchmarks.png").stat().st_size > 10_000
