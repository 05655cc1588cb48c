"""A worker context without TorchServe: the real `ts.context.Context`, filled in as TorchServe 0.12's worker fills it
(ts/service.py), so that a handler's `initialize` and `handle` run in-process or under torchrun as they do in a
worker."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Union

if TYPE_CHECKING:
    from ts.context import Context


def worker_context(model_dir: Union[str, Path], model_yaml_config: dict, *, config_file: Optional[str] = None,
                   batch_size: int = 1) -> "Context":
    """What the worker hands `initialize`: the model folder, a manifest naming `config_file` (the archived
    model-config.yaml, whose line numbers the validator reports) and the config TorchServe parsed; ready for a
    first batch of `batch_size` requests."""
    import ts
    from ts.context import Context

    manifest = {"model": {"configFile": config_file} if config_file else {}}
    context = Context("model", str(model_dir), manifest, batch_size, None, ts.__version__, metrics=None,
                      model_yaml_config=model_yaml_config)
    return start_batch(context, batch_size)


def start_batch(context: "Context", size: int) -> "Context":
    """What the worker sets before each `handle`: a request id and a RequestProcessor (request headers, response
    status and headers) per row of the batch."""
    from ts.context import RequestProcessor

    context.request_ids = {index: f"request-{index}" for index in range(size)}
    context.request_processor = [RequestProcessor({}) for _ in range(size)]
    return context


def failed_statuses(context: "Context") -> Dict[int, int]:
    """Row -> status code, for each row of the last batch that `handle` did not answer with 200."""
    codes = {index: context.get_response_status(index)[0] for index in context.request_ids}
    return {index: code for index, code in codes.items() if code != 200}
