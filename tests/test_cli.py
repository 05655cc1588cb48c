"""`ts-plugin validate` and `ts-plugin schema`, run as a user runs them: a subprocess."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

GOOD = ("minWorkers: 1\nmaxWorkers: 1\nparallelType: tp\ntorchrun:\n  nproc-per-node: 2\n"
        "  rdzv-endpoint: localhost:29501\n")  # a rendezvous of its own: no TSP212
WARN = "minWorkers: 0\n"
BAD = "parallelType: tp\nparallelLevel: 2\n"
DS = GOOD + "deepspeed:\n  config: ds-config.json\n"

FINDING_KEYS = {"code", "severity", "key", "line", "column", "message", "hint"}


def ts_plugin(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ts_plugin", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    for name, text in {"good.yaml": GOOD, "warn.yaml": WARN, "bad.yaml": BAD, "ds.yaml": DS,
                       "empty.yaml": ""}.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "ds-config.json").write_text('{"tensor_parallel": {"tp_size": 2}}', encoding="utf-8")
    return tmp_path


# --- exit codes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, code", [
    (["good.yaml"], 0),
    (["warn.yaml"], 0),
    (["good.yaml", "warn.yaml"], 0),
    (["bad.yaml"], 1),
    (["empty.yaml"], 1),
    (["good.yaml", "bad.yaml", "warn.yaml"], 1),
    (["missing.yaml"], 2),
    (["good.yaml", "missing.yaml"], 2),
    (["--format", "xml", "good.yaml"], 2),
    (["--gpus", "-1", "good.yaml"], 2),
    (["--gpus", "two", "good.yaml"], 2),
    ([], 2),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_validate_exit_codes(configs, args, code):
    result = ts_plugin("validate", *args, cwd=configs)
    assert result.returncode == code, result.stdout + result.stderr


def test_usage_errors_say_why_on_stderr(configs):
    missing = ts_plugin("validate", "missing.yaml", cwd=configs)
    assert "missing.yaml" in missing.stderr and missing.stdout == ""
    bad_format = ts_plugin("validate", "--format", "xml", "good.yaml", cwd=configs)
    assert "--format" in bad_format.stderr


def test_join_says_what_it_needs(configs, tmp_path):
    unasked = ts_plugin("join", "model.mar", cwd=configs)
    assert unasked.returncode == 2 and "--management-address" in unasked.stderr
    not_an_archive = tmp_path / "model.mar"
    not_an_archive.write_text("not a zip")
    refused = ts_plugin("join", str(not_an_archive), "--rdzv-id", "m_29500", cwd=configs)
    assert refused.returncode == 2 and "neither a model folder nor a .mar" in refused.stderr


def test_text_format(configs):
    result = ts_plugin("validate", "bad.yaml", "warn.yaml", "good.yaml", cwd=configs)
    assert result.returncode == 1
    assert result.stdout == (
        "bad.yaml:2:1: error TSP202 [parallelLevel] parallelType tp with parallelLevel 2 but no torchrun section: "
        "the frontend never reaches READY\n"
        "    hint: replace `parallelLevel: 2` with `torchrun: {nproc-per-node: 2}`\n"
        "warn.yaml:1:1: warning TSP402 [minWorkers] minWorkers 0 becomes 1 in the frontend\n"
        "    hint: set `minWorkers: 1`\n")
    assert "3 file(s) checked: 1 error(s), 1 warning(s)" in result.stderr


def test_clean_file_prints_no_findings(configs):
    result = ts_plugin("validate", "good.yaml", cwd=configs)
    assert (result.returncode, result.stdout) == (0, "")


# --- --format json -------------------------------------------------------------------------------

def test_json_format_structure(configs):
    result = ts_plugin("validate", "--format", "json", "bad.yaml", "warn.yaml", "good.yaml", cwd=configs)
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert set(data) == {"files"}
    assert [entry["file"] for entry in data["files"]] == ["bad.yaml", "warn.yaml", "good.yaml"]
    for entry in data["files"]:
        assert set(entry) == {"file", "findings"}
        for finding in entry["findings"]:
            assert set(finding) == FINDING_KEYS
            assert isinstance(finding["line"], int) and isinstance(finding["column"], int)
            assert finding["severity"] in ("error", "warning")
    assert data["files"][0]["findings"] == [{
        "code": "TSP202", "severity": "error", "key": "parallelLevel", "line": 2, "column": 1,
        "message": "parallelType tp with parallelLevel 2 but no torchrun section: the frontend never reaches READY",
        "hint": "replace `parallelLevel: 2` with `torchrun: {nproc-per-node: 2}`"}]
    assert [f["code"] for f in data["files"][1]["findings"]] == ["TSP402"]
    assert data["files"][2]["findings"] == []


def test_json_format_exit_zero_with_warnings(configs):
    result = ts_plugin("validate", "--format", "json", "warn.yaml", cwd=configs)
    assert result.returncode == 0
    assert json.loads(result.stdout)["files"][0]["findings"][0]["severity"] == "warning"


# --- --format github -----------------------------------------------------------------------------

def test_github_format(configs):
    result = ts_plugin("validate", "--format", "github", "bad.yaml", "warn.yaml", cwd=configs)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("::error file=bad.yaml,line=2,col=1,")
    assert "TSP202" in lines[0] and "torchrun: {nproc-per-node: 2}" in lines[0]
    assert lines[1].startswith("::warning file=warn.yaml,line=1,col=1,")
    for line in lines:
        assert re.match(r"^::(error|warning) file=[^,]+,line=\d+,col=\d+,title=[^:]+::.+$", line), line


def test_github_format_one_line_per_finding_even_for_multiline_messages(configs):
    (configs / "syntax.yaml").write_text("minWorkers: 1\n  maxWorkers: 2\n", encoding="utf-8")
    result = ts_plugin("validate", "--format", "github", "syntax.yaml", cwd=configs)
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    assert line.startswith("::error file=syntax.yaml,line=2,col=13,title=TSP101")


def test_github_format_escapes_property_values(configs):
    (configs / "a,b.yaml").write_text(BAD, encoding="utf-8")
    result = ts_plugin("validate", "--format", "github", "a,b.yaml", cwd=configs)
    assert result.stdout.startswith("::error file=a%2Cb.yaml,line=2,col=1,")


# --- --extra-files and --gpus ----------------------------------------------------------------------

def test_extra_files_are_the_archive_contents(configs):
    (configs / "other.json").write_text("{}", encoding="utf-8")
    missing = ts_plugin("validate", "--format", "json", "--extra-files", "other.json", "ds.yaml", cwd=configs)
    assert missing.returncode == 1
    [finding] = json.loads(missing.stdout)["files"][0]["findings"]
    assert (finding["code"], finding["key"], finding["line"], finding["column"]) == ("TSP603", "deepspeed.config", 8, 3)
    present = ts_plugin("validate", "--extra-files", "other.json,ds-config.json", "ds.yaml", cwd=configs)
    assert (present.returncode, present.stdout) == (0, "")


def test_extra_files_folder(configs):
    model = configs / "model"
    model.mkdir()
    (model / "ds-config.json").write_text('{"tensor_parallel": {"tp_size": 4}}', encoding="utf-8")
    result = ts_plugin("validate", "--format", "json", "--extra-files", "model", "ds.yaml", cwd=configs)
    assert result.returncode == 1
    assert [f["code"] for f in json.loads(result.stdout)["files"][0]["findings"]] == ["TSP605"]


def test_gpus(configs):
    (configs / "gpu.yaml").write_text("deviceType: gpu\n" + GOOD, encoding="utf-8")
    assert ts_plugin("validate", "--gpus", "2", "gpu.yaml", cwd=configs).returncode == 0
    one = ts_plugin("validate", "--format", "json", "--gpus", "1", "gpu.yaml", cwd=configs)
    assert one.returncode == 1
    assert [f["code"] for f in json.loads(one.stdout)["files"][0]["findings"]] == ["TSP306"]
    none = ts_plugin("validate", "--format", "json", "--gpus", "0", "gpu.yaml", cwd=configs)
    assert "TSP608" in [f["code"] for f in json.loads(none.stdout)["files"][0]["findings"]]


# --- schema ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    result = ts_plugin("schema", cwd=tmp_path_factory.mktemp("schema"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_schema_properties(schema):
    assert schema["type"] == "object"
    for key in ("parallelType", "parallelLevel", "torchrun", "pippy", "deepspeed", "handler", "deviceIds",
                "minWorkers", "maxWorkers"):
        assert key in schema["properties"], key


def test_schema_validates_examples(schema):
    jsonschema = pytest.importorskip("jsonschema")
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    good = yaml.safe_load(GOOD + "deepspeed:\n  config: ds-config.json\n  tensor_parallel: {tp_size: 2}\n"
                          "handler:\n  model_path: model\n  max_new_tokens: 32\n")
    assert list(validator.iter_errors(good)) == []
    assert list(validator.iter_errors(yaml.safe_load(WARN))) == []
    assert not validator.is_valid({"parallelType": 5})
    assert not validator.is_valid({"parallelType": "dp"})
    assert not validator.is_valid({"minWorkers": "1"})
    assert not validator.is_valid({"torchrun": {"nproc_per_node": 2}})


def test_schema_accepts_what_the_validator_accepts(schema):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert validator.is_valid({"parallelType": "TP", "deviceType": "GPU", "torchrun": {"nproc-per-node": 2}})


# --- no heavy imports ------------------------------------------------------------------------------

HEAVY = ("torch", "deepspeed", "accelerate", "transformers")


@pytest.mark.parametrize("args", [["good.yaml"], ["--extra-files", "ds-config.json", "ds.yaml"], ["bad.yaml"]],
                         ids=["clean", "extra-files", "errors"])
def test_validate_does_not_import_heavy_modules(configs, args):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ts_plugin", "validate", *args], cwd=configs,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert imported, "no -X importtime output"
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert heavy == []


# --- the pre-commit hook ---------------------------------------------------------------------------

def test_pre_commit_hook_definition(configs):
    hooks = yaml.safe_load((Path(__file__).resolve().parents[1] / ".pre-commit-hooks.yaml").read_text())
    [hook] = [h for h in hooks if h["id"] == "ts-plugin-validate"]
    assert (hook["entry"], hook["language"]) == ("ts-plugin validate", "python")
    pattern = re.compile(hook["files"])
    for path in ("model-config.yaml", "examples/tp/model-config.yaml", "model-config-tp.yml", "cfg/model-config.yml"):
        assert pattern.search(path), path
    for path in ("config.yaml", "model-config.json", "model-config/other.yaml", "docs/model-config.yaml.md"):
        assert not pattern.search(path), path
    # pre-commit runs `entry` with the staged file names appended
    assert hook["entry"].split()[1:] == ["validate"]
    result = ts_plugin(*hook["entry"].split()[1:], "good.yaml", "bad.yaml", cwd=configs)
    assert result.returncode == 1 and "bad.yaml:2:1: error TSP202" in result.stdout
