"""The handler files and example configs shipped inside the package: setup.py maps the repository's `handlers/`
and `examples/` folders to `ts_plugin.bundled.handlers` and `ts_plugin.bundled.examples`, so one lookup finds them
in a wheel and in an editable install alike."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: the base handler file, for every parallelType (`ts-plugin archive --handler ts_plugin|<parallelType>` packs it)
HANDLER = "llm_handler.py"
#: the name that stands for it where a handler is named
HANDLER_NAME = "ts_plugin"


def handler_file(name: str = HANDLER) -> Path:
    """A shipped handler file, by file name; `ts_plugin` is the base handler."""
    return Path(str(files(f"{__name__}.handlers").joinpath(HANDLER if name == HANDLER_NAME else name)))


def example_config(name: str) -> Path:
    """The model-config.yaml of a shipped example (tp, pp, pptp, custom, invalid)."""
    return Path(str(files(f"{__name__}.examples").joinpath(name, "model-config.yaml")))
