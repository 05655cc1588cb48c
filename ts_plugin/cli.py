"""The `ts-plugin` command: validate, archive, schema, rules, reference, convert-gguf, demo, join."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .config import ValidationContext, validate_file
from .config.parallel_types import PARALLEL_TYPES
from .gguf import DTYPES as GGUF_DTYPES
from .testing.demo import DEMO_MODELS

FORMATS = ("text", "json", "github")


def _github_line(source: str, finding) -> str:
    def escape(text: str, prop: bool = False) -> str:
        text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        return text.replace(":", "%3A").replace(",", "%2C") if prop else text

    level = "error" if finding.severity == "error" else "warning"
    return (f"::{level} file={escape(source, True)},line={finding.line},col={finding.column},"
            f"title={escape(finding.code + ' ' + finding.key, True)}::{escape(finding.message + '. Fix: ' + finding.hint)}")


def cmd_validate(args: argparse.Namespace) -> int:
    from .archive import archive_contents

    if args.format not in FORMATS:  # argparse checks too; kept for programmatic callers
        print(f"ts-plugin validate: --format must be one of {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    archive_files = archive_contents(args.extra_files) if args.extra_files else None
    reports = []
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            print(f"ts-plugin validate: cannot read {name}: no such file", file=sys.stderr)
            return 2
        try:
            reports.append(validate_file(path, ValidationContext(archive_files=archive_files, gpus=args.gpus)))
        except (OSError, UnicodeDecodeError) as err:
            print(f"ts-plugin validate: cannot read {name}: {err}", file=sys.stderr)
            return 2
    if args.format == "json":
        print(json.dumps({"files": [{"file": r.source, "findings": [f.to_dict() for f in r.findings]}
                                    for r in reports]}, indent=2))
    else:
        for report in reports:
            for finding in report.findings:
                print(_github_line(report.source, finding) if args.format == "github" else finding.format(report.source))
        if args.format == "text":
            errors = sum(len(r.errors) for r in reports)
            warnings = sum(len(r.findings) for r in reports) - errors
            print(f"{len(reports)} file(s) checked: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
    return 0 if all(r.ok for r in reports) else 1


def cmd_schema(args: argparse.Namespace) -> int:
    from .config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from .config import rules_table

    print(rules_table())
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from .config.reference import reference_markdown, replace_in

    if args.write:
        path = Path(args.write)
        path.write_text(replace_in(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(reference_markdown())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .testing.demo import run_demo

    try:
        return run_demo(workdir=Path(args.workdir), parallel_types=args.only, model=args.model)
    except Exception as error:  # noqa: BLE001 - the demo reports any failed step and exits non-zero
        print(f"demo failed: {error}", file=sys.stderr)
        return 1


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from .gguf import convert_gguf

    try:
        folder = convert_gguf(args.gguf_file, args.out, dtype=args.dtype)
    except (OSError, ValueError) as error:
        print(f"ts-plugin convert-gguf: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    import logging

    from .join import JoinError, frontend_rdzv_id, join

    if not (args.rdzv_id or args.management_address):
        print("ts-plugin join: give --management-address (TorchServe's management API names the worker) or "
              "--rdzv-id", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ts-plugin join: %(message)s")

    def rdzv_id(archived_name: str) -> str:
        return args.rdzv_id or frontend_rdzv_id(args.management_address, args.model_name or archived_name,
                                                args.management_key)

    try:
        return join(Path(args.model), rdzv_id, args.rdzv_endpoint, rounds=args.rounds)
    except (JoinError, OSError) as error:
        print(f"ts-plugin join: {error}", file=sys.stderr)
        return 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-plugin", description="Large-model serving on TorchServe 0.12.")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check model-config.yaml files")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument("--format", choices=FORMATS, default="text")
    validate.add_argument("--extra-files", help="the --extra-files you will give torch-model-archiver (comma-separated)")
    validate.add_argument("--gpus", type=_positive_int, help="GPUs on the serving host")
    validate.set_defaults(func=cmd_validate)
    sub.add_parser("archive", help="validate --config-file, then run torch-model-archiver with the same arguments",
                   add_help=False)
    sub.add_parser("schema", help="print the JSON Schema of model-config.yaml").set_defaults(func=cmd_schema)
    sub.add_parser("rules", help="print the validation rules").set_defaults(func=cmd_rules)
    reference = sub.add_parser("reference", help="print the Markdown configuration and rules reference")
    reference.add_argument("--write", metavar="README", help="replace the generated block in this file")
    reference.set_defaults(func=cmd_reference)
    convert = sub.add_parser("convert-gguf", help="dequantise a GGUF file into a HuggingFace model folder")
    convert.add_argument("gguf_file", metavar="GGUF_FILE")
    convert.add_argument("out", metavar="OUT_DIR")
    convert.add_argument("--dtype", choices=GGUF_DTYPES, default="float32")
    convert.set_defaults(func=cmd_convert_gguf)
    demo = sub.add_parser("demo", help="archive a model per parallelType, serve it and query it")
    demo.add_argument("--workdir", default="demo-work")
    demo.add_argument("--only", nargs="*", choices=list(PARALLEL_TYPES), default=None)
    demo.add_argument("--model", choices=DEMO_MODELS, default=None,
                      help="smollm2 (a real model; the default when the demo extra is installed) or tiny")
    demo.set_defaults(func=cmd_demo)
    joining = sub.add_parser("join", help="serve this node's part of a model whose torchrun.nnodes > 1 (run it "
                                          "on every node but TorchServe's)")
    joining.add_argument("model", metavar="MODEL", help="the .mar, or the folder of --archive-format no-archive")
    joining.add_argument("--management-address", metavar="URL",
                         help="TorchServe's management API (http://HOST:8081), which names the worker to join")
    joining.add_argument("--management-key", help="its `management` key (key_file.json) where token auth is on")
    joining.add_argument("--model-name", help="the name the model is registered under (default: the archive's)")
    joining.add_argument("--rdzv-id", help="the worker's rendezvous id, <model name>_<worker id>, instead of asking")
    joining.add_argument("--rdzv-endpoint", help="host:port of the rendezvous (default: the config's rdzv-endpoint)")
    joining.add_argument("--rounds", type=_positive_int, default=None,
                         help="worker generations to serve, then stop (default: until interrupted)")
    joining.set_defaults(func=cmd_join)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "archive":
        from .archive import archive

        return archive(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
