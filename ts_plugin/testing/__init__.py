"""Helpers for the tests, the demo and the benchmark: a real, isolated TorchServe (`TorchServe`), free ports and
a process-tree killer, a real worker context without TorchServe (`worker_context`), tiny random-weight models
with a local tokenizer (`make_tiny_model`), configs and archives made as a user makes them and the answers a model
must give (`write_config`, `archive_model`, `reference_answers`). Nothing here is needed to serve.

The names are imported on first use: `ts-plugin validate` imports the demo's model names from here and must not
pull in psutil, requests or torch."""
from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "TorchServe": "torchserve", "TorchServeError": "torchserve", "java_available": "torchserve",
    "torchrun_agent": "torchserve",
    "free_ports": "processes", "kill_process_tree": "processes",
    "worker_context": "context", "start_batch": "context", "failed_statuses": "context",
    "make_tiny_model": "tiny_model", "make_tokenizer": "tiny_model",
    "write_config": "packaging", "archive_model": "packaging", "reference_answers": "packaging",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
