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
#: the row labels the table must have
FIGURE_ROWS = (
    "1. Parity pp 2", "1. Parity tp 2", "1. Parity pptp 2x2", "1. Parity custom", "2. Serving overhead tp 2",
    "3. Tensor-parallel efficiency tp 2", "4. Pipeline overlap pp 2",
    "5. Memory pp 2 at load", "5. Memory pp 2 serving", "5. Memory tp 2 at load", "5. Memory tp 2 serving",
    "5. Memory custom at load", "5. Memory custom serving",
    "6. Start-up pp 2", "6. Start-up tp 2", "6. Start-up pptp 2x2", "6. Start-up custom",
)


def test_smoke_benchmark_writes_every_figure(tmp_path):
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


def test_serving_smoke_benchmark_writes_its_table(tmp_path):
    """bench.serving on a tiny model, custom only (no anchor): every server answers like single-process generate
    and its rows land in the serving block of benchmarks.md, next to hand-written text that stays."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "benchmarks.md").write_text("# written by hand\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "bench.serving", "--smoke", "--only", "custom", "--out", str(out),
                             "--workdir", str(tmp_path / "work")],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    page = (out / "benchmarks.md").read_text()
    assert page.startswith("# written by hand\n")
    block = page.split("<!-- bench:serving-custom:begin", 1)[1].split("<!-- bench:serving-custom:end -->")[0]
    rows = {line.split(" | ")[0][2:]: line for line in block.splitlines() if line.startswith("| custom-")}
    assert set(rows) == {"custom-static", "custom-continuous", "custom-continuous-b8", "custom-continuous-b8-mkl-head",
                         "custom-continuous-b8-compiled", "custom-static-1client", "custom-continuous-steps1-1client",
                         "custom-continuous-steps4-1client"}
    assert all(line.endswith("| yes |") for line in rows.values()), rows
    assert (out / "serving-benchmark-custom.json").is_file()
