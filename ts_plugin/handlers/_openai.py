"""OpenAI's completions and chat completions, on the routes TorchServe 0.12 passes to the handler.

`POST /predictions/{model}/{version}/v1/completions` reaches the handler with the request header `url_path`
= "v1/completions" (frontend InferenceRequestHandler; the version segment is required, or "v1" is taken for
it). Served: v1/completions, v1/chat/completions, v1/models. Parsing is pure and deterministic, like the TGI
parser: every rank reaches the same verdict before any collective.
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional

from ..requests import Limits, RequestError, SamplingParams, TextRequest, check_prompt
from ._tgi import MAX_STOP_SEQUENCES, decode_body, number

COMPLETIONS, CHAT, MODELS = "v1/completions", "v1/chat/completions", "v1/models"
ROUTES = (COMPLETIONS, CHAT, MODELS)
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options", "user",
           "logprobs", "presence_penalty", "frequency_penalty"}
_FIELDS = {COMPLETIONS: _COMMON | {"prompt", "echo", "best_of", "suffix"},
           CHAT: _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}}
FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def parse_openai(row: Dict[str, Any], route: str, limits: Limits, tokenizer: Any,
                 chat_template: Optional[str]) -> TextRequest:
    """One request row of an OpenAI route -> a checked TextRequest, or RequestError (404 for other routes)."""
    if route not in (COMPLETIONS, CHAT):
        raise RequestError(f"unknown route {route!r}; this model serves {', '.join(ROUTES)}", 404)
    body = decode_body(row, limits)
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS[route])
    if unknown:
        raise RequestError(f"unsupported field(s) {', '.join(unknown)}; supported: {', '.join(sorted(_FIELDS[route]))}")
    if body.get("n", 1) != 1:
        raise RequestError(f"n is {body['n']!r}; this server returns one choice per request (n: 1)")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise RequestError("logprobs are not supported")
    if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1):
        raise RequestError("echo, suffix and best_of are not supported")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if body.get(penalty) not in (None, 0, 0.0):
            raise RequestError(f"{penalty} is not supported (use 0)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f'"stream" must be true or false, not {stream!r}')
    stream_options = body.get("stream_options")
    if stream_options is not None and not (isinstance(stream_options, dict)
                                           and isinstance(stream_options.get("include_usage", False), bool)):
        raise RequestError(f'"stream_options" must be an object like {{"include_usage": true}}, not {stream_options!r}')
    prompt = _prompt(body) if route == COMPLETIONS else _chat_prompt(body, tokenizer, chat_template)
    request = TextRequest(check_prompt(prompt), _params(body, limits), stream, api=route)
    request.model = body.get("model") if isinstance(body.get("model"), str) else None
    request.include_usage = bool((stream_options or {}).get("include_usage")) and stream
    return request


def _prompt(body: Dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError('"prompt" must be a string (or a list of one string)')
    return prompt


def _chat_prompt(body: Dict[str, Any], tokenizer: Any, chat_template: Optional[str]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list of {"role", "content"} objects')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{index}] must be an object with a role and a content")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{index}].content must be a string")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise RequestError("this model has no chat template (its tokenizer defines none and handler.chat_template "
                           "is not set); use v1/completions, or set handler.chat_template in model-config.yaml")
    try:
        return tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                             chat_template=template, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # noqa: BLE001 - a template's own checks (roles, order) raise anything
        raise RequestError(f"the chat template refused these messages: {error}") from None


def _params(body: Dict[str, Any], limits: Limits) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = limits.max_new_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"max_tokens must be a positive integer, not {max_tokens!r}")
    if max_tokens > limits.max_new_tokens:
        raise RequestError(f"max_tokens is {max_tokens}; this model allows at most {limits.max_new_tokens}")
    temperature = number(body, "temperature", float, 1.0, 0.0, 2.0, field="temperature")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError(f"seed must be a non-negative integer, not {seed!r}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings")
    top_p = number(body, "top_p", float, 1.0, 0.0, 1.0, low_open=True, field="top_p")
    # OpenAI samples unless temperature is 0, which means greedy
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature or 1.0, top_p=top_p,
                          do_sample=temperature > 0, seed=seed, stop=stop)


class OpenAIFormat:
    """Bodies and server-sent events of one OpenAI request."""

    def __init__(self, request: TextRequest, request_id: str, model: str):
        self.request = request
        self.chat = request.api == CHAT
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"
        self.model = request.model or model
        self.created = int(time.time())
        self._role_sent = False

    def _envelope(self, choices: List[dict], chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""), "created": self.created,
                "model": self.model, "choices": choices}

    def whole(self, result) -> dict:
        finish = FINISH_REASONS[result.finish_reason]
        choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish}
                  if self.chat else {"index": 0, "text": result.text, "finish_reason": finish, "logprobs": None})
        return {**self._envelope([choice], chunk=False), "usage": usage(result)}

    def event(self, text: str, result=None) -> str:
        """The server-sent events for new text, and after the last text the finish and [DONE]."""
        finish = FINISH_REASONS[result.finish_reason] if result is not None else None
        if self.chat:
            delta = {"content": text}
            if not self._role_sent:
                delta, self._role_sent = {"role": "assistant", **delta}, True
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        chunk = self._envelope([choice], chunk=True)
        if result is None:
            return _sse(chunk)
        events = _sse(chunk)
        if self.request.include_usage:
            events += _sse({**self._envelope([], chunk=True), "usage": usage(result)})
        return events + "data: [DONE]\n\n"


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def models_list(model: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "ts_plugin"}]}


def error_body(error: RequestError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": str(error), "type": kind, "param": None, "code": error.status}}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
