"""One module per engine; each turns a validated config into this rank's `StepModel` (or `Follower`).

| parallelType | engine module | handler file | class |
| --- | --- | --- | --- |
| pp | engines/pipeline.py | handlers/pipeline_handler.py | PipelineHandler |
| tp | engines/deepspeed.py | handlers/deepspeed_handler.py | DeepSpeedHandler |
| pptp | engines/pptp.py | handlers/pptp_handler.py | PPTPHandler |
| custom | engines/accelerate.py | handlers/accelerate_handler.py | AccelerateHandler |
"""
from __future__ import annotations

import importlib
from typing import Dict

from .base import EngineError, Follower, HFStepModel, Loaded, LoadContext, StepModel

#: parallelType -> engine module (imported on first use: each pulls in its own library)
ENGINES: Dict[str, str] = {"pp": "pipeline", "tp": "deepspeed", "pptp": "pptp", "custom": "accelerate"}


def load(context: LoadContext) -> Loaded:
    """Build this rank's part of the model with the engine of the config's parallelType.

    Example::

        context = LoadContext(config, layout, Ranks.from_env(), model_path, model_dir, device, dtype, print)
        step_model = load(context)  # a StepModel, or a Follower on pp ranks 1..n-1
    """
    parallel_type = context.layout.parallel_type
    if parallel_type not in ENGINES:
        raise EngineError(f"parallelType {parallel_type or '(unset)'!r} has no engine; "
                          f"set parallelType to one of {', '.join(ENGINES)}")
    module = importlib.import_module(f".{ENGINES[parallel_type]}", __name__)
    return module.load(context)


__all__ = ["ENGINES", "EngineError", "Follower", "HFStepModel", "LoadContext", "Loaded", "StepModel", "load"]
