"""The parallelType registry: a fifth parallelType is one record and one engine module. The toy record below is
added at run time; the schema, the layout, the rules, the engine loader and the handler all pick it up."""
from __future__ import annotations

import importlib
import inspect
import json

import pytest

from _llm import PROMPTS, REPO, reference_text
from ts_plugin.config import ParallelLayout, validate_data
from ts_plugin.config.parallel_types import PARALLEL_TYPES, ParallelType


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests/data/toy"))
    monkeypatch.setitem(PARALLEL_TYPES, "toy", ParallelType("toy", "toy_engine", torchrun=False))
    return importlib.import_module("toy_engine")


def test_every_record_has_an_engine_and_an_example():
    assert set(PARALLEL_TYPES) == {p.parent.name for p in (REPO / "examples").glob("*/model-config.yaml")} - {"invalid"}
    for record in PARALLEL_TYPES.values():
        assert callable(importlib.import_module(record.engine).load)
        # TorchServe 0.12 launches torchrun only for the parallelTypes its frontend knows
        assert not record.torchrun or record.name in ("pp", "tp", "pptp")


def test_the_one_handler_file_has_one_class():
    """TorchServe's loader takes the one class the handler file itself defines."""
    spec = importlib.util.spec_from_file_location("llm_handler", REPO / "handlers/llm_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from ts_plugin.handlers import LLMHandler

    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    assert len(classes) == 1 and issubclass(classes[0], LLMHandler)


def test_a_new_record_is_validated_like_the_others(toy):
    report = validate_data({"parallelType": "TOY", "deviceType": "cpu"}, "model-config.yaml")
    assert report.ok, report.text()
    layout = ParallelLayout.of(report.config)
    assert (layout.parallel_type, layout.world_size, layout.uses_torchrun, layout.pp_size, layout.tp_size) == \
        ("toy", 1, False, 1, 1)
    # sections that the record's features do not use are refused, naming the types that use them
    report = validate_data({"parallelType": "toy", "pippy": {"chunks": 1}, "torchrun": {"nproc-per-node": 2}},
                           "model-config.yaml")
    by_rule = {f.code: f for f in report.findings}
    assert "pp or pptp" in by_rule["TSP501"].hint
    assert "toy runs one process" in by_rule["TSP205"].message
    # and an unknown name lists it among the choices
    report = validate_data({"parallelType": "tyo"}, "model-config.yaml")
    assert "'toy'" in report.errors[0].message


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from ts_plugin.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("toy") / "llama", arch="llama")


def test_a_new_record_serves_through_the_handler(toy, tiny_llama):
    from ts_plugin.handlers import LLMHandler
    from ts_plugin.testing import worker_context

    handler = LLMHandler()
    handler.initialize(worker_context(tiny_llama, {"parallelType": "toy", "deviceType": "cpu"}))
    try:
        assert toy.LOADED and toy.LOADED[-1].layout.parallel_type == "toy"
        context = worker_context(tiny_llama, {})
        body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 8}}
        answer = handler.handle([{"body": json.dumps(body).encode()}], context)[0]
        assert answer["generated_text"] == reference_text(tiny_llama, PROMPTS[0], 8)
    finally:
        handler.shutdown()
