"""One module per engine; each turns a validated config into this rank's `StepModel` (or `Follower`). Which
module serves a parallelType is its record's `engine` (ts_plugin/config/parallel_types.py)."""
from __future__ import annotations

import importlib

from ..config.parallel_types import PARALLEL_TYPES, parallel_type
from .base import EngineError, Follower, HFStepModel, Loaded, LoadContext, StepModel


def load(context: LoadContext) -> Loaded:
    """Build this rank's part of the model with the engine of the config's parallelType.

    Example::

        context = LoadContext(config, layout, Ranks.from_env(), model_path, model_dir, device, dtype, print)
        step_model = load(context)  # a StepModel, or a Follower on pp ranks 1..n-1
    """
    record = parallel_type(context.layout.parallel_type)
    if record is None:
        raise EngineError(f"parallelType {context.layout.parallel_type or '(unset)'!r} has no engine; "
                          f"set parallelType to one of {', '.join(PARALLEL_TYPES)}")
    return importlib.import_module(record.engine).load(context)


__all__ = ["EngineError", "Follower", "HFStepModel", "LoadContext", "Loaded", "StepModel", "load"]
