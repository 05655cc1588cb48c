"""OpenAI's tools on chat completions: the request's `tools` and `tool_choice` checked, the grammar that forces a
call, and the model's text turned back into `tool_calls`.

- `tool_choice: "required"` holds the answer to a JSON list of calls, `[{"name": ..., "parameters": {...}}]`, each
  name one of the tools and its parameters that tool's schema (the shape vLLM forces); one call only with
  `parallel_tool_calls: false`;
- a named function holds the answer to that function's parameters schema: the text is the call's arguments;
- `"auto"` lets the model write what it likes; a parser for its family's tool-call markup
  (`handler.tool_call_parser`, vLLM's names) finds the calls in the text;
- `"none"` (and no tools) is an ordinary chat.
The tools reach the chat template as `tools=`, which renders them as the model was trained to read them.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, get_args

from ..config.schema import ToolCallParser
from ..requests import RequestError
from ..structured_output import ANY_OBJECT, Grammar, strict_schema

TOOL_CALL_PARSERS = get_args(ToolCallParser)


@dataclass(frozen=True)
class ToolChoice:
    """How a chat request's answer relates to its tools."""
    mode: str  # "required" | "function" | "auto"
    function: Optional[str] = None  # mode "function": the forced function's name
    parser: Optional[str] = None  # mode "auto": handler.tool_call_parser


def parse_tools(tools: Optional[List[Any]], choice: Any, parallel_tool_calls: Optional[bool],
                tool_call_parser: Optional[str]
                ) -> Tuple[Optional[List[Dict[str, Any]]], Optional[ToolChoice], Optional[Grammar]]:
    """(the tools for the chat template, how to read the answer, the grammar that forces a call) of a chat body's
    tools, tool_choice and parallel_tool_calls; (None, None, None) for a request without tools or with
    tool_choice "none"."""
    if tools is None:
        if choice not in (None, "none"):
            raise RequestError('"tool_choice" needs "tools"')
        return None, None, None
    if not isinstance(tools, list) or not tools:
        raise RequestError('"tools" must be a non-empty list of {"type": "function", "function": {...}}')
    functions: Dict[str, Tuple[Dict[str, Any], str]] = {}  # name -> (parameters schema, where it was given)
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f'tools[{index}] must be {{"type": "function", "function": {{"name": ..., '
                               '"parameters": {...}}}')
        parameters = function.get("parameters", ANY_OBJECT)
        if not isinstance(parameters, dict):
            raise RequestError(f"tools[{index}].function.parameters must be a JSON schema object")
        if function.get("strict") is True:
            parameters = strict_schema(parameters)
        if function["name"] in functions:
            raise RequestError(f"tools[{index}]: the function name {function['name']!r} appears twice")
        functions[function["name"]] = (parameters, f"tools[{index}].function.parameters")
    choice = "auto" if choice is None else choice
    if choice == "none":
        return tools, None, None
    if choice == "required":
        one_call = [{"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                     "required": ["name", "parameters"], "additionalProperties": False}
                    for name, (parameters, _) in functions.items()]
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": one_call}}
        if parallel_tool_calls is False:
            calls["maxItems"] = 1
        return tools, ToolChoice("required"), Grammar.json_schema(calls, "tools")
    if choice == "auto":
        if tool_call_parser is None:
            raise RequestError('"tool_choice": "auto" needs a parser for this model\'s tool-call markup: set '
                               f"handler.tool_call_parser ({', '.join(TOOL_CALL_PARSERS)}) in model-config.yaml, "
                               'or send "required" or a named function')
        return tools, ToolChoice("auto", parser=tool_call_parser), None
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name not in functions:
        raise RequestError('"tool_choice" must be "none", "auto", "required" or {"type": "function", "function": '
                           f'{{"name": one of {", ".join(functions)}}}}}, not {choice!r}')
    return tools, ToolChoice("function", function=name), Grammar.json_schema(*functions[name])


def tool_calls(text: str, choice: ToolChoice) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """(the content left, OpenAI's tool_calls) read from an answer's text. Text that holds no complete call
    (an answer cut by max_tokens) stays content, with no calls."""
    if choice.mode == "function":
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [_call(choice.function, arguments)]
    if choice.mode == "required":
        try:
            return None, [_call(call["name"], call["parameters"]) for call in json.loads(text)]
        except (json.JSONDecodeError, KeyError, TypeError):
            return text, []
    return _PARSERS[choice.parser](text)


def _call(name: str, arguments: Any) -> Dict[str, Any]:
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _calls_of(objects: List[Any], arguments_key: str) -> List[Dict[str, Any]]:
    return [_call(obj["name"], obj.get(arguments_key, {})) for obj in objects
            if isinstance(obj, dict) and isinstance(obj.get("name"), str)]


def _hermes(text: str) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """Hermes, Qwen 2.5 and others: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number."""
    found = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, flags=re.DOTALL)
    objects = []
    for raw in found:
        try:
            objects.append(json.loads(raw))
        except json.JSONDecodeError:
            return text, []
    calls = _calls_of(objects, "arguments")
    if not calls:
        return text, []
    content = re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.DOTALL).strip()
    return content or None, calls


def _llama3_json(text: str) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """Llama 3.1+: the answer is one JSON call `{"name": ..., "parameters": {...}}` (after an optional
    <|python_tag|>), or several separated by `;`."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    try:
        objects = [json.loads(part) for part in body.split(";") if part.strip()]
    except json.JSONDecodeError:
        return text, []
    calls = _calls_of(objects, "parameters") or _calls_of(objects, "arguments")
    return (None, calls) if calls else (text, [])


def _mistral(text: str) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` after any content."""
    content, marker, rest = text.partition("[TOOL_CALLS]")
    if not marker:
        return text, []
    try:
        objects = json.loads(rest.strip())
    except json.JSONDecodeError:
        return text, []
    calls = _calls_of(objects if isinstance(objects, list) else [objects], "arguments")
    return (content.strip() or None, calls) if calls else (text, [])


_PARSERS = {"hermes": _hermes, "llama3_json": _llama3_json, "mistral": _mistral}
