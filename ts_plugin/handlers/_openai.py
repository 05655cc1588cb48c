"""OpenAI's completions and chat completions, on the routes TorchServe 0.12 passes to the handler.

`POST /predictions/{model}/{version}/v1/completions` reaches the handler with the request header `url_path`
= "v1/completions" (frontend InferenceRequestHandler; the version segment is required, or "v1" is taken for
it). Served: v1/completions, v1/chat/completions, v1/models, and vLLM's tokenize and detokenize as v1/tokenize and
v1/detokenize. Parsing is pure and deterministic, like the TGI parser: every rank reaches the same verdict before
any collective.
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..requests import Limits, RequestError, SamplingParams, TextRequest, check_prompt, check_seed, check_stops
from ..structured_output import ANY_OBJECT, Grammar, strict_schema
from ._tgi import decode_body, number
from ._tools import parse_tools, tool_calls

COMPLETIONS, CHAT, MODELS = "v1/completions", "v1/chat/completions", "v1/models"
TOKENIZE, DETOKENIZE = "v1/tokenize", "v1/detokenize"
ROUTES = (COMPLETIONS, CHAT, MODELS, TOKENIZE, DETOKENIZE)
#: answered from the tokenizer alone, at once
TOKENIZER_ROUTES = (TOKENIZE, DETOKENIZE)
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options", "user",
           "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty",
           "response_format"}
_FIELDS = {COMPLETIONS: _COMMON | {"prompt", "echo", "best_of", "suffix"},
           CHAT: _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                            "parallel_tool_calls"}}
FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default max_logprobs
MAX_CHOICES = 8  # n: each choice is a row of the batch


def parse_openai(row: Dict[str, Any], route: str, limits: Limits, tokenizer: Any,
                 chat_template: Optional[str], served_names: Sequence[str],
                 tool_call_parser: Optional[str] = None) -> TextRequest:
    """One request row of an OpenAI route -> a checked TextRequest, or RequestError (404 for other routes and
    for a model name not in `served_names`). `tool_call_parser`: handler.tool_call_parser, for tool_choice auto."""
    if route not in (COMPLETIONS, CHAT):
        raise RequestError(f"unknown route {route!r}; this model serves {', '.join(ROUTES)}", 404)
    body = _object_body(row, limits, served_names)
    unknown = sorted(set(body) - _FIELDS[route])
    if unknown:
        raise RequestError(f"unsupported field(s) {', '.join(unknown)}; supported: {', '.join(sorted(_FIELDS[route]))}")
    if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1):
        raise RequestError("echo, suffix and best_of are not supported")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f'"stream" must be true or false, not {stream!r}')
    stream_options = body.get("stream_options")
    if stream_options is not None and not (isinstance(stream_options, dict)
                                           and isinstance(stream_options.get("include_usage", False), bool)):
        raise RequestError(f'"stream_options" must be an object like {{"include_usage": true}}, not {stream_options!r}')
    tools, tool_choice, tool_grammar = parse_tools(body, tool_call_parser) if route == CHAT else (None, None, None)
    prompt = _prompt(body) if route == COMPLETIONS else _chat_prompt(body, tokenizer, chat_template, tools=tools)
    params = _params(body, limits, len(tokenizer), route)
    if tool_grammar is not None:
        if params.grammar is not None:
            raise RequestError('"response_format" and a tool_choice that forces a call cannot both hold the answer')
        params.grammar = tool_grammar
    request = TextRequest(check_prompt(prompt), params, stream, api=route, add_special_tokens=route == COMPLETIONS,
                          tool_choice=tool_choice)
    request.model = body.get("model") if isinstance(body.get("model"), str) else None
    request.include_usage = bool((stream_options or {}).get("include_usage")) and stream
    request.n = number(body, "n", int, 1, 1, MAX_CHOICES, field="n")
    return request


def _object_body(row: Dict[str, Any], limits: Limits, served_names: Sequence[str]) -> Dict[str, Any]:
    body = decode_body(row, limits)
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in served_names:
        raise RequestError(f"The model `{model}` does not exist; this server serves {', '.join(served_names)} "
                           "(handler.served_model_name)", 404)
    return body


def tokenizer_answer(row: Dict[str, Any], route: str, limits: Limits, tokenizer: Any, chat_template: Optional[str],
                     served_names: Sequence[str], max_model_len: Optional[int]) -> Dict[str, Any]:
    """vLLM's tokenize ({"prompt"} or {"messages"}) and detokenize ({"tokens"}) answers."""
    body = _object_body(row, limits, served_names)
    if route == DETOKENIZE:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                   and 0 <= t < len(tokenizer) for t in tokens):
            raise RequestError(f'"tokens" must be a list of token ids from 0 to {len(tokenizer) - 1}')
        return {"prompt": tokenizer.decode(tokens)}
    if "messages" in body:
        prompt = _chat_prompt(body, tokenizer, chat_template, body.get("add_generation_prompt", True))
        special = body.get("add_special_tokens", False)
    else:
        prompt, special = _prompt(body), body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise RequestError('"add_special_tokens" must be true or false')
    tokens = tokenizer(check_prompt(prompt), add_special_tokens=special)["input_ids"]
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens}


def _prompt(body: Dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError('"prompt" must be a string (or a list of one string)')
    return prompt


#: what a chat message may carry to the template besides role and content
_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id")


def _chat_prompt(body: Dict[str, Any], tokenizer: Any, chat_template: Optional[str],
                 add_generation_prompt: Any = True, tools: Optional[List[Dict[str, Any]]] = None) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list of {"role", "content"} objects')
    if not isinstance(add_generation_prompt, bool):
        raise RequestError('"add_generation_prompt" must be true or false')
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise RequestError("this model has no chat template (its tokenizer defines none and handler.chat_template "
                           "is not set); use v1/completions, or set handler.chat_template in model-config.yaml")
    messages = [_message(index, message) for index, message in enumerate(messages)]
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tools=tools,
                                             add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as error:  # noqa: BLE001 - a template's own checks (roles, order) raise anything
        raise RequestError(f"the chat template refused these messages: {error}") from None


def _message(index: int, message: Any) -> Dict[str, Any]:
    """A chat message for the template: its text parts joined (as vLLM joins them), with its name and tool calls."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError(f"messages[{index}] must be an object with a role and a content")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part_index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{index}].content[{part_index}] is of type {kind!r}; this model reads "
                                   'text only: {"type": "text", "text": ...}')
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is None and message.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise RequestError(f"messages[{index}].content must be a string or a list of text parts")
    return {"role": message["role"], "content": content,
            **{key: message[key] for key in _MESSAGE_FIELDS if message.get(key) is not None}}


def _params(body: Dict[str, Any], limits: Limits, vocab_size: int, route: str) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = limits.max_new_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"max_tokens must be a positive integer, not {max_tokens!r}")
    if max_tokens > limits.max_new_tokens:
        raise RequestError(f"max_tokens is {max_tokens}; this model allows at most {limits.max_new_tokens}")
    temperature = number(body, "temperature", float, 1.0, 0.0, 2.0, field="temperature")
    top_p = number(body, "top_p", float, 1.0, 0.0, 1.0, low_open=True, field="top_p")
    # OpenAI samples unless temperature is 0, which means greedy whatever top_p says
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature or 1.0,
                          top_p=top_p if temperature > 0 else 1.0, do_sample=temperature > 0,
                          seed=check_seed(body.get("seed"), "seed"), stop=check_stops(body.get("stop"), "stop"),
                          include_stop=False,
                          presence_penalty=number(body, "presence_penalty", float, 0.0, -2.0, 2.0,
                                                  field="presence_penalty"),
                          frequency_penalty=number(body, "frequency_penalty", float, 0.0, -2.0, 2.0,
                                                   field="frequency_penalty"),
                          repetition_penalty=number(body, "repetition_penalty", float, 1.0, 0.0, 100.0, low_open=True,
                                                    field="repetition_penalty"),
                          logit_bias=_logit_bias(body.get("logit_bias"), vocab_size),
                          logprobs=_logprobs(body, route), grammar=_response_format(body.get("response_format")))


def _response_format(value: Any) -> Optional[Grammar]:
    """OpenAI's response_format -> the grammar: none for text, any JSON object for json_object, the schema for
    json_schema (enforced whether or not it says strict, as vLLM does; strict also closes its objects to keys
    they do not list, as OpenAI's strict mode requires of a schema)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_schema(ANY_OBJECT, "response_format")
    spec = value.get("json_schema") if kind == "json_schema" else None
    if isinstance(spec, dict) and isinstance(spec.get("schema", ANY_OBJECT), dict):
        schema = spec.get("schema", ANY_OBJECT)
        return Grammar.json_schema(strict_schema(schema) if spec.get("strict") is True else schema,
                                   "response_format.json_schema.schema")
    raise RequestError('"response_format" must be {"type": "text"}, {"type": "json_object"} or {"type": '
                       f'"json_schema", "json_schema": {{"name": ..., "schema": {{...}}}}}}, not {value!r}')


def _logprobs(body: Dict[str, Any], route: str) -> Optional[int]:
    """How many alternatives per token, or None for no logprobs: completions' `logprobs: k`, chat's
    `logprobs: true` with `top_logprobs: k`."""
    if route == COMPLETIONS:
        return number(body, "logprobs", int, None, 0, MAX_LOGPROBS, field="logprobs")
    wanted = body.get("logprobs", False)
    if not isinstance(wanted, bool) and wanted is not None:
        raise RequestError(f'"logprobs" must be true or false, not {wanted!r}')
    top = number(body, "top_logprobs", int, None, 0, MAX_LOGPROBS, field="top_logprobs")
    if top is not None and not wanted:
        raise RequestError('"top_logprobs" needs "logprobs": true')
    return (top or 0) if wanted else None


def _logit_bias(value: Any, vocab_size: int) -> Dict[int, float]:
    """OpenAI's {"token id": bias from -100 to 100}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError('"logit_bias" must be an object of {"token id": bias}')
    bias = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise RequestError(f"logit_bias key {key!r} is not a token id from 0 to {vocab_size - 1}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not -100 <= amount <= 100:
            raise RequestError(f"logit_bias[{key!r}] must be a number from -100 to 100, not {amount!r}")
        bias[token] = float(amount)
    return bias


class OpenAIFormat:
    """Bodies and server-sent events of one OpenAI request, with its `n` choices."""

    def __init__(self, request: TextRequest, request_id: str, model: str, tokenizer: Any):
        self.request = request
        self.tokenizer = tokenizer
        self.chat = request.api == CHAT
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"
        self.model = request.model or model
        self.created = int(time.time())
        self._role_sent: set = set()  # chat: the choices whose first delta went out
        self._text_offset: Dict[int, int] = {}  # completions: choice -> text_offset of its next token
        self._finished: Dict[int, Any] = {}  # streaming: choice -> its result
        self._held: Dict[int, list] = {}  # streaming with tools: choice -> its logprobs until it ends

    def _envelope(self, choices: List[dict], chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""), "created": self.created,
                "model": self.model, "choices": choices}

    def whole(self, results: List[Any]) -> dict:
        """The answer once every choice finished."""
        choices = []
        for index, result in enumerate(results):
            finish = FINISH_REASONS[result.finish_reason]
            logprobs = self._logprobs(result.logprobs or [], index)
            if self.chat:
                message, finish = self._message(result.text, finish)
                choices.append({"index": index, "message": {"role": "assistant", **message}, "finish_reason": finish,
                                "logprobs": logprobs})
            else:
                choices.append({"index": index, "text": result.text, "finish_reason": finish, "logprobs": logprobs})
        return {**self._envelope(choices, chunk=False), "usage": usage(results)}

    def event(self, text: str, result=None, logprobs=(), choice: int = 0) -> str:
        """The server-sent event for a choice's new text (with its tokens' logprobs) and, with its result, its
        finish; after the last choice's finish, the usage (where asked) and [DONE]."""
        finish = FINISH_REASONS[result.finish_reason] if result is not None else None
        if self.chat and self.request.tool_choice is not None:
            # the calls are read from the whole text: a choice's deltas are held back until it ends
            held = self._held.setdefault(choice, [])
            held.extend(logprobs)
            if result is None:
                return ""
            message, finish = self._message(result.text, finish)
            message["tool_calls"] = [{"index": at, **call} for at, call in enumerate(message.get("tool_calls", []))]
            delta, logprobs = {key: value for key, value in message.items() if value}, held
        elif self.chat:
            delta = {"content": text}
        if self.chat:
            if choice not in self._role_sent:
                delta = {"role": "assistant", **delta}
                self._role_sent.add(choice)
            body = {"index": choice, "delta": delta, "finish_reason": finish,
                    "logprobs": self._logprobs(logprobs, choice)}
        else:
            body = {"index": choice, "text": text, "finish_reason": finish, "logprobs": self._logprobs(logprobs, choice)}
        events = _sse(self._envelope([body], chunk=True))
        if result is None:
            return events
        self._finished[choice] = result
        if len(self._finished) < self.request.n:
            return events
        if self.request.include_usage:
            events += _sse({**self._envelope([], chunk=True), "usage": usage(list(self._finished.values()))})
        return events + "data: [DONE]\n\n"

    def _message(self, text: str, finish: str) -> Tuple[Dict[str, Any], str]:
        """A chat choice's message (without its role) and finish_reason: its text, or the tool calls read from it
        (finish_reason "tool_calls", except for a named function, where OpenAI says "stop")."""
        choice = self.request.tool_choice
        content, calls = tool_calls(text, choice) if choice is not None else (text, [])
        if not calls:
            return {"content": text}, finish
        return {"content": content, "tool_calls": calls}, finish if choice.mode == "function" else "tool_calls"

    def _logprobs(self, entries, choice: int) -> Optional[dict]:
        """OpenAI's logprobs object for these tokens: completions' parallel lists, or chat's content list."""
        if self.request.params.logprobs is None:
            return None
        token = self._token_text
        if self.chat:
            return {"content": [{**token(chosen), "logprob": logprob,
                                 "top_logprobs": [{**token(other), "logprob": value} for other, value in top]}
                                for chosen, logprob, top in entries]}
        texts = [token(chosen)["token"] for chosen, _, _ in entries]
        offsets = []
        for text in texts:
            offsets.append(self._text_offset.get(choice, 0))
            self._text_offset[choice] = offsets[-1] + len(text)
        return {"tokens": texts, "token_logprobs": [logprob for _, logprob, _ in entries],
                "top_logprobs": [self._by_text(top) for _, _, top in entries],
                "text_offset": offsets}

    def _by_text(self, top) -> Dict[str, float]:
        """Completions' {token text: logprob}; where two tokens decode alike (partial UTF-8) the likelier stays."""
        by_text: Dict[str, float] = {}
        for token_id, logprob in top:
            by_text.setdefault(self._token_text(token_id)["token"], logprob)
        return by_text

    def _token_text(self, token_id: int) -> dict:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "bytes": list(text.encode("utf-8"))}


def usage(results: List[Any]) -> dict:
    """One request's usage: its prompt once, the tokens of every choice."""
    prompt, completion = results[0].prompt_tokens, sum(result.completion_tokens for result in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens}}


def models_list(model: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "ts_plugin"}]}


def error_body(error: RequestError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": str(error), "type": kind, "param": None, "code": error.status}}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
