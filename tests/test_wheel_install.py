"""ts_plugin installed from its wheel (not editable) into a fresh virtualenv and used from a folder outside the
repository: the handlers and examples ship inside the package, `ts-plugin archive --handler custom` packs the shipped
handler, and the demo serves from the installed package on the real TorchServe."""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(cmd: List[object], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    return result


class Installed:
    def __init__(self, root: Path):
        self.bin = root / "venv" / "bin"
        self.python = self.bin / "python"
        self.purelib = Path(run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                root).stdout.strip())
        self.user = root / "user"  # the working folder: no repository files reachable from it
        self.user.mkdir()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    # build from a copy: pip builds in the source tree, and a stale build/ there would leak into later wheels
    source = root / "source"
    for folder in ("ts_plugin", "handlers", "examples"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "setup.py", source)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", source],
        root)
    (wheel,) = (root / "dist").glob("ts_plugin-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], root)
    env = Installed(root)
    # torch, TorchServe, pip... come from this environment's site-packages through a path line; the .pth files
    # there (the editable ts_plugin's finder among them) are not run from a path line, so the wheel's is the
    # only ts_plugin
    (env.purelib / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    run([env.python, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check", wheel], root)
    # launchers of the fresh venv's own (TorchServe's workers run the interpreter that started the frontend)
    for name in ("torchserve", "torchrun"):
        (entry,) = importlib.metadata.entry_points(group="console_scripts", name=name)
        script = env.bin / name
        script.write_text(f"#!{env.python}\nimport sys\nfrom {entry.module} import {entry.attr}\n"
                          f"sys.exit({entry.attr}())\n", encoding="utf-8")
        script.chmod(0o755)
    imported = run([env.python, "-c", "import ts_plugin; print(ts_plugin.__file__)"], env.user).stdout.strip()
    assert Path(imported).is_relative_to(env.purelib), imported
    return env


def test_validate_and_archive_the_shipped_files(installed, tmp_path):
    example = installed.purelib / "ts_plugin/bundled/examples/custom/model-config.yaml"
    result = subprocess.run([installed.bin / "ts-plugin", "validate", example], cwd=installed.user,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 file(s) checked: 0 error(s)" in result.stderr

    from ts_plugin.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "model", arch="llama", layers=2, hidden=32)
    run([installed.bin / "ts-plugin", "archive", "--model-name", "tiny", "--version", "1.0", "--handler", "custom",
         "--extra-files", model, "--config-file", example, "--export-path", installed.user,
         "--archive-format", "no-archive", "--force"], installed.user)
    packed = installed.user / "tiny"
    manifest = json.loads((packed / "MAR-INF" / "MANIFEST.json").read_text(encoding="utf-8"))
    assert manifest["model"]["handler"] == "llm_handler.py"
    assert (packed / "llm_handler.py").read_bytes() == (REPO / "handlers/llm_handler.py").read_bytes()


@pytest.mark.serve
def test_demo_runs_from_the_installed_package(installed):
    from ts_plugin.testing import java_available

    if not java_available():
        pytest.skip("TorchServe needs Java 11+")
    result = subprocess.run([installed.bin / "ts-plugin", "demo", "--model", "tiny", "--workdir", "demo"],
                            cwd=installed.user, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    assert "all answers identical to single-process generate (greedy): True" in result.stdout
