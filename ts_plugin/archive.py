"""`ts-plugin archive`: validate model-config.yaml, then run torch-model-archiver in-process."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from .bundled import HANDLER_NAME, handler_file
from .config import Report, ValidationContext, validate_file
from .config.parallel_types import PARALLEL_TYPES


def archive_contents(extra_files: Optional[str], *named: Optional[str]) -> Dict[str, Path]:
    """Archive-relative path -> local file, as torch-model-archiver lays files out.

    A file goes to the archive root by its base name; a folder's contents go to the root.
    """
    contents: Dict[str, Path] = {}
    for entry in named:
        if entry and os.path.isfile(entry):
            contents[os.path.basename(entry)] = Path(entry)
    for pattern in (extra_files or "").split(","):
        pattern = pattern.strip()
        if not pattern:
            continue
        for match in glob.glob(pattern) or [pattern]:
            path = Path(match)
            if path.is_file():
                contents[path.name] = path
            elif path.is_dir():
                for file in path.rglob("*"):
                    if file.is_file():
                        contents[file.relative_to(path).as_posix()] = file
    return contents


def validate_archive_inputs(config_file: str, extra_files: Optional[str], handler: Optional[str] = None,
                            gpus: Optional[int] = None) -> Report:
    """Validate a config against the files that will be packed beside it."""
    files = archive_contents(extra_files, handler, config_file)
    return validate_file(config_file, ValidationContext(archive_files=files, gpus=gpus))


@contextlib.contextmanager
def _private_tempdir() -> Iterator[str]:
    # torch-model-archiver stages files in $TMPDIR/<model-name> and leaves them on failure
    staging = tempfile.mkdtemp(prefix="ts-plugin-archive-")
    previous = tempfile.tempdir
    tempfile.tempdir = staging
    try:
        yield staging
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(staging, ignore_errors=True)


def _resolve_handler(handler: str) -> str:
    """--handler as torch-model-archiver takes it (a file, `file:function`, one of its built-in handler names), or
    `ts_plugin` or a parallelType, which stand for ts_plugin's base handler file (it serves every parallelType)."""
    from model_archiver.model_packaging_utils import model_handlers

    file = handler if ".py" in handler else handler.split(":")[0] + ".py"  # the archiver's reading of the name
    if os.path.isfile(handler) or os.path.isfile(file) or handler in model_handlers:
        return handler
    if handler == HANDLER_NAME or handler in PARALLEL_TYPES:
        return str(handler_file())
    raise ValueError(f"--handler {handler!r} is not a file; give a handler file, {HANDLER_NAME} or a parallelType "
                     f"({', '.join(PARALLEL_TYPES)}: ts_plugin's base handler, which serves every parallelType) or "
                     f"one of torch-model-archiver's built-in handlers "
                     f"({', '.join(model_handlers)})")


def _parse_archiver_args(argv: List[str]):
    from model_archiver.arg_parser import ArgParser

    saved = sys.argv
    sys.argv = ["ts-plugin archive", *argv]
    try:
        return ArgParser.export_model_args_parser()
    finally:
        sys.argv = saved


def archive(argv: List[str], out=None, err=None) -> int:
    """Validate, then package exactly as `torch-model-archiver argv...` would. Returns an exit code.

    Example:
        archive(["--model-name", "llama", "--version", "1.0", "--handler", "ts_plugin",
                 "--extra-files", "model/", "--config-file", "model-config.yaml", "--archive-format", "no-archive"])
    """
    from model_archiver.model_packaging import generate_model_archive
    from model_archiver.model_packaging_utils import ModelExportUtils

    out, err = out or sys.stdout, err or sys.stderr  # per call: a default bound at import keeps that moment's stream
    config = _parse_archiver_args(argv)  # argparse exits 2 on usage errors, like torch-model-archiver
    if config.runtime.startswith("python"):  # the LSP runtime's handlers are C++ libraries
        try:
            config.handler = _resolve_handler(config.handler)
        except ValueError as error:
            print(f"ts-plugin archive: {error}", file=err)
            return 2
    if config.config_file:
        if not os.path.isfile(config.config_file):
            print(f"ts-plugin archive: --config-file {config.config_file!r} does not exist", file=err)
            return 2
        report = validate_archive_inputs(config.config_file, config.extra_files, config.handler)
        if report.findings:
            print(report.text(), file=err)
        if not report.ok:
            print(f"ts-plugin archive: {len(report.errors)} error(s) in {config.config_file}; no archive written", file=err)
            return 1
    target = ModelExportUtils.get_archive_export_path(config.export_path, config.model_name, config.archive_format)
    existed = os.path.exists(target)
    try:
        with _private_tempdir():
            generate_model_archive(config)
    except BaseException as error:  # noqa: BLE001 - clean up on any failure, then report
        if not existed or config.force:
            _remove(target)
        if isinstance(error, KeyboardInterrupt):
            raise
        print(f"ts-plugin archive: torch-model-archiver failed: {error}", file=err)
        return 1
    print(f"ts-plugin archive: wrote {target}", file=out)
    return 0


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
