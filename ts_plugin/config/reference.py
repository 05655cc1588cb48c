"""The README's configuration and rules reference, generated from the schema and the rules."""
from __future__ import annotations

import types
import typing
from typing import Any, Type

from pydantic import BaseModel

from .rules import rules_table
from .schema import SECTIONS

BEGIN, END = "<!-- BEGIN generated reference (ts-plugin reference) -->", "<!-- END generated reference -->"


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (list, typing.List):
        return f"list of {_type_name(args[0])}"
    if origin in (dict, typing.Dict):
        return f"map {_type_name(args[0])} -> {_type_name(args[1])}"
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _section_table(prefix: tuple, model: Type[BaseModel]) -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in model.model_fields.items():
        if (prefix + (info.alias or name,)) in SECTIONS:
            continue
        key = ".".join(prefix + (info.alias or name,))
        default = "" if info.is_required() else repr(info.get_default(call_default_factory=True))
        if isinstance(info.get_default(call_default_factory=True), BaseModel):
            default = ""
        rows.append(f"| `{key}` | {_type_name(info.annotation)} | {default.replace('|', '/')} | "
                    f"{(info.description or '').replace('|', '/')} |")
    return "\n".join(rows)


def reference_markdown() -> str:
    parts = [BEGIN, "", "### model-config.yaml keys", ""]
    for prefix, model in SECTIONS.items():
        title = "top level (TorchServe frontend)" if not prefix else f"`{'.'.join(prefix)}`"
        parts += [f"#### {title}", "", _section_table(prefix, model), ""]
    parts += ["### Validation rules", "", rules_table(), "", END]
    return "\n".join(parts)


def replace_in(text: str) -> str:
    """Replace the generated block of a README text with the current reference."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + reference_markdown() + text[end:]
