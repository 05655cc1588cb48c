"""Security rules of the config and the worker, no server needed: YAML's Python tags are refused and never run,
files named in the config stay inside the model folder, and remote code is off unless asked for."""
from __future__ import annotations

import json
import sys

import pytest

from _llm import REPO

PYTHON_TAGS = ["!!python/object/apply:os.system", "!!python/object/new:os.system", "!!python/name:os.system",
               "!!python/object:builtins.object"]


@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_python_tags_in_model_config_are_refused_not_run(tag, tmp_path):
    from ts_plugin.config import validate_file

    marker = tmp_path / "pwned"
    config = tmp_path / "model-config.yaml"
    config.write_text(f"minWorkers: 1\nhandler: {tag} ['touch {marker}']\n", encoding="utf-8")
    report = validate_file(config)
    assert [f.code for f in report.findings] == ["TSP101"], report.text()
    assert not report.ok and not marker.exists()


@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_a_worker_refuses_a_python_tag_in_the_archived_config_and_does_not_run_it(tag, tmp_path, monkeypatch):
    from ts_plugin.handlers import LLMHandler
    from ts_plugin.handlers.base import ConfigError
    from ts_plugin.testing import worker_context

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    marker = tmp_path / "pwned"
    (tmp_path / "model-config.yaml").write_text(f"minWorkers: 1\nhandler: {tag} ['touch {marker}']\n")
    # TorchServe's own safe_load fails on the tag, and the worker then gets no config at all
    with pytest.raises(ConfigError, match="TSP101"):
        LLMHandler().initialize(worker_context(tmp_path, {}, config_file="model-config.yaml"))
    assert not marker.exists()


def test_archive_refuses_a_python_tag(tmp_path):
    from ts_plugin.archive import archive as ts_archive

    marker = tmp_path / "pwned"
    config = tmp_path / "model-config.yaml"
    config.write_text(f"minWorkers: 1\nhandler: !!python/object/apply:os.system ['touch {marker}']\n")
    store = tmp_path / "store"
    store.mkdir()
    code = ts_archive(["--model-name", "m", "--version", "1.0", "--handler", str(REPO / "handlers/llm_handler.py"),
                       "--config-file", str(config), "--export-path", str(store), "--archive-format", "no-archive"])
    assert code == 1 and not marker.exists() and not any(store.iterdir())


@pytest.mark.parametrize("text, key, code", [
    ("handler:\n  model_path: ../x\n", "handler.model_path", "TSP602"),
    ("handler:\n  model_path: a/../../x\n", "handler.model_path", "TSP602"),
    ("parallelType: custom\nhandler:\n  offload_folder: ../x\n", "handler.offload_folder", "TSP602"),
    ("parallelType: custom\nhandler:\n  offload_folder: off/../../x\n", "handler.offload_folder", "TSP602"),
    ("parallelType: custom\nhandler:\n  offload_folder: /tmp/offload\n", "handler.offload_folder", "TSP601"),
    ("deepspeed:\n  config: ../ds.json\n", "deepspeed.config", "TSP602"),
    ("deepspeed:\n  checkpoint: /etc/ck.json\n", "deepspeed.checkpoint", "TSP601"),
])
def test_named_files_stay_inside_the_model_folder(text, key, code):
    from ts_plugin.config import validate_text

    report = validate_text(text)
    assert [(f.code, f.key) for f in report.errors] == [(code, key)], report.text()


def test_trust_remote_code_is_off_unless_asked_and_then_a_warning():
    from ts_plugin.config import validate_text

    assert validate_text("minWorkers: 1\n").config.handler.trust_remote_code is False
    report = validate_text("handler:\n  trust_remote_code: true\n")
    assert report.ok and [(f.code, f.severity) for f in report.findings] == [("TSP607", "warning")]
    assert report.config.handler.trust_remote_code is True


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from ts_plugin.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("trust") / "llama", arch="llama", layers=2)


@pytest.mark.parametrize("trust", [None, True], ids=["unset", "true"])
@pytest.mark.parametrize("parallel_type, extra", [("custom", {}), ("pp", {"torchrun": {"nproc-per-node": 1}})])
def test_trust_remote_code_reaches_every_transformers_load(tiny_llama, monkeypatch, parallel_type, extra, trust):
    """Each AutoConfig / AutoTokenizer / AutoModelForCausalLM load that ts_plugin makes while a worker starts is
    told handler.trust_remote_code: False unless the config turns it on."""
    import transformers

    from ts_plugin.handlers import LLMHandler
    from ts_plugin.testing import worker_context

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    passed = []
    loads = [(transformers.AutoConfig, "from_pretrained"), (transformers.AutoTokenizer, "from_pretrained"),
             (transformers.AutoModelForCausalLM, "from_pretrained"), (transformers.AutoModelForCausalLM, "from_config")]
    for auto_class, method in loads:
        def recording(*args, load=getattr(auto_class, method), where=f"{auto_class.__name__}.{method}", **kwargs):
            # only ts_plugin's own calls: transformers' inner ones pass on what they were given
            if sys._getframe(1).f_globals.get("__name__", "").startswith("ts_plugin"):
                passed.append((where, kwargs.get("trust_remote_code", "not passed")))
            return load(*args, **kwargs)

        monkeypatch.setattr(auto_class, method, recording)
    handler_config = {"max_new_tokens": 4} if trust is None else {"max_new_tokens": 4, "trust_remote_code": trust}
    config = {"parallelType": parallel_type, "deviceType": "cpu", "handler": handler_config, **extra}
    handler = LLMHandler()
    handler.initialize(worker_context(tiny_llama, config))
    handler.shutdown()
    loaded = {where for where, _ in passed}
    assert {"AutoTokenizer.from_pretrained", "AutoConfig.from_pretrained"} <= loaded, passed
    assert loaded & {"AutoModelForCausalLM.from_pretrained", "AutoModelForCausalLM.from_config"}, passed
    assert {value for _, value in passed} == {bool(trust)}, passed


TP2 = "parallelType: tp\ntorchrun:\n  nproc-per-node: 2\n  rdzv-endpoint: localhost:29501\n"


@pytest.mark.parametrize("ds_config, named", [
    ({"checkpoint": "/etc/ck.json"}, "TSP601"),
    ({"checkpoint": "../ck.json"}, "TSP602"),
    ({"base_dir": "../../elsewhere"}, "TSP602"),
    ({"save_mp_checkpoint_path": "/tmp/out"}, "TSP601"),
    ({"checkpoint": {"type": "ds_model", "checkpoints": ["../../w.pt"]}}, "TSP602"),
    ({"checkpoint": {"type": "ds_model", "checkpoints": {"tp": ["/w0.pt"], "non_tp": ["ok.pt"]}}}, "TSP601"),
], ids=["checkpoint-absolute", "checkpoint-escapes", "base_dir", "save_mp_checkpoint_path", "inline-list",
        "inline-tp-dict"])
def test_file_keys_inside_the_deepspeed_json_stay_inside_the_model_folder(tmp_path, ds_config, named):
    """deepspeed.config's whole JSON reaches init_inference: its own file keys pass the same rules."""
    from ts_plugin.config import ValidationContext, validate_text

    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    report = validate_text(TP2 + "deepspeed:\n  config: ds.json\n", context=ValidationContext(model_dir=tmp_path))
    assert [f.code for f in report.errors] == [named], report.text()
    assert all(f.key == "deepspeed.config" for f in report.findings), report.text()
    if "checkpoint" in ds_config:
        assert "TSP611" in [f.code for f in report.findings], report.text()


def test_a_deepspeed_checkpoint_json_lists_only_files_inside_and_is_said_to_be_unpickled(tmp_path):
    from ts_plugin.config import ValidationContext, validate_text

    text = TP2 + "deepspeed:\n  checkpoint: ck.json\n"
    context = ValidationContext(model_dir=tmp_path)
    (tmp_path / "ck.json").write_text(json.dumps({"type": "ds_model", "checkpoints": ["w0.pt", "w1.pt"]}))
    report = validate_text(text, context=context)
    assert report.ok and [(f.code, f.key) for f in report.findings] == [("TSP611", "deepspeed.checkpoint")]
    assert "unpickles" in report.findings[0].message
    (tmp_path / "ck.json").write_text(json.dumps({"type": "ds_model", "checkpoints": ["w0.pt", "../../../etc/w.pt"],
                                                  "base_dir": "/srv"}))
    report = validate_text(text, context=context)
    assert sorted(f.code for f in report.errors) == ["TSP601", "TSP602"], report.text()
