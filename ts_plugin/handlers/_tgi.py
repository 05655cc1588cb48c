"""The text-generation-inference shape: request bodies parsed and checked (pure and deterministic:
every rank reaches the same verdict on the same bytes, before any collective."""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..requests import Limits, RequestError, SamplingParams, TextRequest, check_prompt, check_seed, check_stops
from ..structured_output import Grammar

PARAMETERS = ("max_new_tokens", "temperature", "top_k", "top_p", "do_sample", "seed", "stop",
              "repetition_penalty", "grammar")
# TGI parameters we accept for compatibility but do not act on
IGNORED_PARAMETERS = ("details", "decoder_input_details", "return_full_text", "truncate", "watermark",
                      "best_of", "typical_p")


def _body(row: Dict[str, Any]) -> Any:
    for key in ("body", "data"):
        if row.get(key) is not None:
            return row[key]
    raise RequestError("the request has no body")


def decode_body(row: Dict[str, Any], limits: Limits) -> Any:
    """A row's body as TorchServe hands it over (bytes, str or already-parsed JSON) -> str or parsed JSON, within
    the size limit and valid UTF-8."""
    body = _body(row)
    if isinstance(body, (bytes, bytearray)):
        if len(body) > limits.max_request_bytes:
            raise RequestError(f"the request body is {len(body)} bytes; the limit is {limits.max_request_bytes}", 413)
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(f"the request body is not valid UTF-8 (byte {err.start})") from None
        stripped = text.lstrip()
        if stripped.startswith("{") or stripped.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                raise RequestError(f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
            except RecursionError:
                raise RequestError("the JSON body nests too deeply") from None
            except ValueError as err:  # an integer over Python's 4,300-digit conversion limit
                raise RequestError(f"the JSON body has a number that cannot be read: {err}") from None
        return text
    if isinstance(body, str) and len(body.encode("utf-8")) > limits.max_request_bytes:
        raise RequestError(f"the request body is larger than {limits.max_request_bytes} bytes", 413)
    if not isinstance(body, str) and len(json.dumps(body)) > limits.max_request_bytes:
        raise RequestError(f"the request body is larger than {limits.max_request_bytes} bytes", 413)
    return body


def parse_request(row: Dict[str, Any], limits: Limits) -> TextRequest:
    """One TorchServe request row -> a checked TextRequest, or RequestError.

    Accepts `{"inputs": str, "parameters": {...}, "stream": bool}` or a plain-text body.
    """
    body = decode_body(row, limits)
    if isinstance(body, str):
        return TextRequest(check_prompt(body), SamplingParams(max_new_tokens=limits.max_new_tokens))
    if not isinstance(body, dict):
        raise RequestError(f'the JSON body must be an object like {{"inputs": "..."}}, not {type(body).__name__}')
    unknown = sorted(set(body) - {"inputs", "parameters", "stream"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; allowed: inputs, parameters, stream")
    if "inputs" not in body:
        raise RequestError('missing "inputs" (the prompt)')
    if not isinstance(body["inputs"], str):
        raise RequestError(f'"inputs" must be a string, not {type(body["inputs"]).__name__}')
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f'"stream" must be true or false, not {stream!r}')
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(f'"parameters" must be an object, not {type(parameters).__name__}')
    params = _params(parameters, limits)
    if stream:
        params.logprobs = 0  # TGI's stream events carry each token's id and logprob
    return TextRequest(check_prompt(body["inputs"]), params, stream)


def number(params: Dict[str, Any], name: str, kind: type, default: Any, low: float, high: float,
           low_open: bool = False, field: str = "") -> Any:
    """A number parameter within bounds; `field` is how messages name it (default parameters.<name>)."""
    field = field or f"parameters.{name}"
    value = params.get(name, default)
    if value is None:
        return default
    ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(f"{field} must be {'a number' if kind is float else 'an integer'}, not {value!r}")
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(f"{field} is {value}; it must be in {bounds}")
    return kind(value)


def _params(params: Dict[str, Any], limits: Limits) -> SamplingParams:
    unknown = sorted(set(params) - set(PARAMETERS) - set(IGNORED_PARAMETERS))
    if unknown:
        raise RequestError(f"unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(PARAMETERS)}")
    max_new = params.get("max_new_tokens", limits.max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise RequestError(f"parameters.max_new_tokens must be a positive integer, not {max_new!r}")
    if max_new > limits.max_new_tokens:
        raise RequestError(f"parameters.max_new_tokens is {max_new}; this model allows at most {limits.max_new_tokens}")
    do_sample = params.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise RequestError(f"parameters.do_sample must be true or false, not {do_sample!r}")
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=number(params, "temperature", float, 1.0, 0.0, 100.0, low_open=True),
        top_k=number(params, "top_k", int, 0, 0, 1_000_000),
        top_p=number(params, "top_p", float, 1.0, 0.0, 1.0, low_open=True),
        do_sample=do_sample,
        seed=check_seed(params.get("seed"), "parameters.seed"),
        stop=check_stops(params.get("stop"), "parameters.stop"),
        repetition_penalty=number(params, "repetition_penalty", float, 1.0, 0.0, 100.0, low_open=True),
        grammar=_grammar(params.get("grammar")),
    )


def _grammar(value: Any) -> Optional[Grammar]:
    """TGI's {"type": "json", "value": JSON schema} or {"type": "regex", "value": pattern}."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    schema = value.get("value") if isinstance(value, dict) else None
    if kind == "json" and isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise RequestError(f"parameters.grammar.value is not JSON: {err.msg}") from None
    if kind == "json" and isinstance(schema, dict):
        return Grammar.json_schema(schema, "parameters.grammar")
    if kind == "regex" and isinstance(schema, str):
        return Grammar.regex(schema, "parameters.grammar")
    raise RequestError('parameters.grammar must be {"type": "json", "value": a JSON schema} or '
                       f'{{"type": "regex", "value": a pattern}}, not {value!r}')


class TGIFormat:
    """text-generation-inference's answer (`postprocess`: the handler's, which a subclass may override) and its
    stream: server-sent events, one per token, `data: {"index", "token": {"id", "text", "logprob", "special"},
    "generated_text", "details"}`, the last with the whole answer, as TGI streams them. A token whose text is not
    complete yet (part of a UTF-8 character) has an empty text; the text comes with the token that completes it."""

    def __init__(self, request: TextRequest, postprocess: Callable[[TextRequest, Any], Dict[str, Any]],
                 special_ids: Sequence[int] = ()):
        self.request = request
        self.postprocess = postprocess
        self.special_ids = set(special_ids)
        self._index = 0

    def whole(self, results: List[Any]) -> Dict[str, Any]:
        return self.postprocess(self.request, results[0])  # one choice: TGI has no n

    def event(self, text: str, result=None, logprobs=(), choice: int = 0) -> str:
        # a step's text goes with its last token (a step decodes one token unless handler.steps_per_call says more);
        # as TGI, an answer that ended with an end of sequence sends that token last
        ended = [result.end_logprob] if result is not None and result.end_logprob is not None else []
        tokens = list(logprobs) + ended or [(None, None, [])]
        events = []
        for at, (token_id, logprob, _) in enumerate(tokens):
            last = at == len(tokens) - 1
            self._index += 1
            event = {"index": self._index, "token": {"id": token_id, "text": text if last else "", "logprob": logprob,
                                                     "special": token_id in self.special_ids},
                     "generated_text": None, "details": None}
            if last and result is not None:
                event.update(self.whole([result]))
            events.append(f"data: {json.dumps(event)}\n\n")
        return "".join(events)
