"""The handler files and example configs shipped inside the package: setup.py maps the repository's `handlers/`
and `examples/` folders to `ts_plugin.bundled.handlers` and `ts_plugin.bundled.examples`, so one lookup finds them
in a wheel and in an editable install alike."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: parallelType -> its base handler file (`ts-plugin archive --handler TYPE` and the demo)
HANDLERS = {"tp": "deepspeed_handler.py", "pp": "pipeline_handler.py", "pptp": "pptp_handler.py",
            "custom": "accelerate_handler.py"}


def handler_file(name: str) -> Path:
    """A shipped handler file, by file name or by the parallelType it serves."""
    return Path(str(files(f"{__name__}.handlers").joinpath(HANDLERS.get(name, name))))


def example_config(name: str) -> Path:
    """The model-config.yaml of a shipped example (tp, pp, pptp, custom, invalid)."""
    return Path(str(files(f"{__name__}.examples").joinpath(name, "model-config.yaml")))
