"""`ts-plugin archive`: validate first, then make exactly what the real torch-model-archiver makes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ARCHIVER = Path(sys.executable).parent / "torch-model-archiver"

HANDLER = '''\
class EchoHandler:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        return [row.get("body") or row.get("data") for row in data]
'''
GOOD = "minWorkers: 1\nmaxWorkers: 1\nresponseTimeout: 60\n"
BAD = "minWorkers: 1\nparallelType: tp\nparallelLevel: 2\n"
DS = "parallelType: tp\ntorchrun:\n  nproc-per-node: 2\ndeepspeed:\n  config: ds-config.json\n"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "h.py").write_text(HANDLER, encoding="utf-8")
    (tmp_path / "good.yaml").write_text(GOOD, encoding="utf-8")
    (tmp_path / "bad.yaml").write_text(BAD, encoding="utf-8")
    (tmp_path / "ds.yaml").write_text(DS, encoding="utf-8")
    (tmp_path / "x").write_text("extra file\n", encoding="utf-8")
    (tmp_path / "staging").mkdir()
    return tmp_path


def run(cmd: List[str], cwd: Path, tmpdir: Optional[Path] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def ts_archive(*args: str, cwd: Path, tmpdir: Optional[Path] = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "ts_plugin", "archive", *args], cwd, tmpdir)


def common_args(config: str = "good.yaml", extra: str = "x", name: str = "m") -> List[str]:
    return ["--model-name", name, "--version", "1.0", "--handler", "h.py", "--config-file", config,
            "--extra-files", extra]


def _without_timestamp(manifest: bytes) -> dict:
    data = json.loads(manifest)
    data.pop("createdOn", None)
    data.get("model", {}).pop("createdOn", None)
    return data


def read_archive(path: Path, archive_format: str) -> Dict[str, object]:
    """member name -> bytes (MANIFEST.json parsed, timestamp dropped), in the archive's own order."""
    members: Dict[str, bytes] = {}
    if archive_format == "default":
        with zipfile.ZipFile(path) as zf:
            members = {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}
    elif archive_format == "tgz":
        with tarfile.open(path, "r:gz") as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    else:
        members = {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return {name: _without_timestamp(data) if name.endswith("MANIFEST.json") else data
            for name, data in members.items()}


TARGETS = {"default": "m.mar", "tgz": "m.tar.gz", "no-archive": "m"}


@pytest.mark.parametrize("archive_format", ["default", "no-archive", "tgz"])
def test_archive_equals_torch_model_archiver(work, archive_format):
    args = common_args() + ["--archive-format", archive_format]
    (work / "out").mkdir()
    (work / "ref").mkdir()
    ours = ts_archive(*args, "--export-path", "out", cwd=work, tmpdir=work / "staging")
    reference = run([str(ARCHIVER), *args, "--export-path", "ref"], work)
    assert ours.returncode == 0, ours.stderr
    assert reference.returncode == 0, reference.stderr
    assert sorted(os.listdir(work / "out")) == sorted(os.listdir(work / "ref")) == [TARGETS[archive_format]]
    got = read_archive(work / "out" / TARGETS[archive_format], archive_format)
    want = read_archive(work / "ref" / TARGETS[archive_format], archive_format)
    assert list(got) == list(want)
    assert got == want
    manifest_name = next(name for name in got if name.endswith("MAR-INF/MANIFEST.json"))
    assert got[manifest_name]["model"] == {"modelName": "m", "handler": "h.py", "modelVersion": "1.0",
                                           "configFile": "good.yaml"}
    names = {name.split("/")[-1] for name in got}
    assert {"h.py", "good.yaml", "x", "MANIFEST.json"} <= names
    assert os.listdir(work / "staging") == []


def test_warnings_do_not_block_the_archive(work):
    (work / "warn.yaml").write_text("minWorkers: 0\nmaxWorkers: 1\n", encoding="utf-8")
    (work / "out").mkdir()
    result = ts_archive(*common_args("warn.yaml"), "--export-path", "out", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "TSP402" in result.stderr
    assert (work / "out" / "m.mar").is_file()


def test_handler_by_name_or_archiver_name(work):
    args = ["--model-name", "m", "--version", "1.0", "--config-file", "good.yaml", "--export-path", "out",
            "--archive-format", "no-archive", "--force"]
    (work / "out").mkdir()
    manifest = work / "out/m/MAR-INF/MANIFEST.json"
    for name in ("ts_plugin", "pp"):  # a parallelType names the same base handler
        assert ts_archive(*args, "--handler", name, cwd=work).returncode == 0
        assert json.loads(manifest.read_text())["model"]["handler"] == "llm_handler.py"
        assert (work / "out/m/llm_handler.py").is_file()
    assert ts_archive(*args, "--handler", "base_handler", cwd=work).returncode == 0  # TorchServe's own, as before
    assert json.loads(manifest.read_text())["model"]["handler"] == "base_handler"
    refused = ts_archive(*args, "--handler", "nope", cwd=work, tmpdir=work / "staging")
    assert refused.returncode == 2
    assert "'nope' is not a file" in refused.stderr and "ts_plugin or a parallelType (pp, tp, pptp, custom" in refused.stderr
    assert "base_handler" in refused.stderr
    assert os.listdir(work / "staging") == []


def test_config_error_writes_nothing(work):
    (work / "out").mkdir()
    result = ts_archive(*common_args("bad.yaml"), "--export-path", "out", cwd=work, tmpdir=work / "staging")
    assert result.returncode == 1
    assert "bad.yaml:3:1: error TSP202 [parallelLevel]" in result.stderr
    assert "torchrun: {nproc-per-node: 2}" in result.stderr
    assert os.listdir(work / "out") == []
    assert os.listdir(work / "staging") == []


@pytest.mark.parametrize("archive_format", ["default", "no-archive", "tgz"])
def test_archiver_failure_leaves_no_partial_output_or_staging(work, archive_format):
    # a missing extra file makes torch-model-archiver fail half-way through copying
    (work / "out").mkdir()
    args = common_args(extra="x,missing.bin") + ["--export-path", "out", "--archive-format", archive_format]
    result = ts_archive(*args, cwd=work, tmpdir=work / "staging")
    assert result.returncode == 1
    assert "missing.bin" in result.stderr
    assert os.listdir(work / "out") == []
    assert os.listdir(work / "staging") == []
    # the plain archiver leaves its staging folder behind: the check above would see it
    (work / "ref").mkdir()
    reference = run([str(ARCHIVER), *common_args(extra="x,missing.bin"), "--export-path", "ref"], work,
                    tmpdir=work / "staging")
    assert reference.returncode != 0
    assert os.listdir(work / "staging") == ["m"]


def test_existing_archive_is_kept_without_force(work):
    (work / "out").mkdir()
    assert ts_archive(*common_args(), "--export-path", "out", cwd=work).returncode == 0
    before = (work / "out" / "m.mar").read_bytes()
    again = ts_archive(*common_args(), "--export-path", "out", cwd=work, tmpdir=work / "staging")
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert (work / "out" / "m.mar").read_bytes() == before
    assert os.listdir(work / "staging") == []
    forced = ts_archive(*common_args(), "--export-path", "out", "--force", cwd=work)
    assert forced.returncode == 0, forced.stderr


# --- files the config references ------------------------------------------------------------------

def _codes(stderr: str) -> List[str]:
    return [part.split()[0] for part in stderr.split(" error ")[1:]]


@pytest.mark.parametrize("ds_config, extra, code", [
    (None, "x", "TSP603"),
    ("not json {", "x,ds-config.json", "TSP604"),
    ('{"tensor_parallel": {"tp_size": 4}}', "x,ds-config.json", "TSP605"),
    ('{"mp_size": 4}', "x,ds-config.json", "TSP605"),
], ids=["missing", "not-json", "tp_size", "mp_size"])
def test_referenced_deepspeed_config(work, ds_config, extra, code):
    if ds_config is not None:
        (work / "ds-config.json").write_text(ds_config, encoding="utf-8")
    (work / "out").mkdir()
    result = ts_archive(*common_args("ds.yaml", extra=extra), "--export-path", "out", cwd=work,
                        tmpdir=work / "staging")
    assert result.returncode == 1, result.stderr
    assert _codes(result.stderr) == [code], result.stderr
    assert f"ds.yaml:5:3: error {code} [deepspeed.config]" in result.stderr
    assert os.listdir(work / "out") == []
    assert os.listdir(work / "staging") == []


def test_missing_deepspeed_config_hint_lists_archive_files(work):
    (work / "out").mkdir()
    result = ts_archive(*common_args("ds.yaml"), "--export-path", "out", cwd=work)
    assert "--extra-files" in result.stderr and "h.py" in result.stderr and "x" in result.stderr


@pytest.mark.parametrize("extra", ["x,ds-config.json", "x,model"], ids=["file", "folder"])
def test_referenced_deepspeed_config_ok(work, extra):
    (work / "ds-config.json").write_text('{"tensor_parallel": {"tp_size": 2}}', encoding="utf-8")
    (work / "model").mkdir()
    (work / "model" / "ds-config.json").write_text('{"tensor_parallel": {"tp_size": 2}}', encoding="utf-8")
    (work / "out").mkdir()
    result = ts_archive(*common_args("ds.yaml", extra=extra), "--export-path", "out", cwd=work)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(work / "out" / "m.mar") as zf:
        assert "ds-config.json" in zf.namelist()


# --- usage errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--version", "1.0", "--handler", "h.py", "--config-file", "good.yaml", "--export-path", "out"],
    ["--model-name", "m", "--handler", "h.py", "--export-path", "out"],
    ["--model-name", "m", "--version", "1.0", "--handler", "h.py", "--config-file", "nope.yaml",
     "--export-path", "out"],
], ids=["no-model-name", "no-version", "missing-config-file"])
def test_usage_errors_exit_2(work, args):
    (work / "out").mkdir()
    result = ts_archive(*args, cwd=work, tmpdir=work / "staging")
    assert result.returncode == 2, result.stdout + result.stderr
    assert os.listdir(work / "out") == []
    assert os.listdir(work / "staging") == []
