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

from ..requests import Limits, RequestError, TextRequest, check_prompt
from ._bodies import ChatBody, CompletionBody, Detokenize, TokenizeChat, TokenizeCompletion, parse_body
from ._tgi import decode_body
from ._tools import parse_tools, tool_calls

COMPLETIONS, CHAT, MODELS = "v1/completions", "v1/chat/completions", "v1/models"
TOKENIZE, DETOKENIZE = "v1/tokenize", "v1/detokenize"
ROUTES = (COMPLETIONS, CHAT, MODELS, TOKENIZE, DETOKENIZE)
#: answered from the tokenizer alone, at once
TOKENIZER_ROUTES = (TOKENIZE, DETOKENIZE)
FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def parse_openai(row: Dict[str, Any], route: str, limits: Limits, tokenizer: Any,
                 chat_template: Optional[str], served_names: Sequence[str],
                 tool_call_parser: Optional[str] = None) -> TextRequest:
    """One request row of an OpenAI route -> a checked TextRequest, or RequestError (404 for other routes and
    for a model name not in `served_names`). `tool_call_parser`: handler.tool_call_parser, for tool_choice auto."""
    if route not in (COMPLETIONS, CHAT):
        raise RequestError(f"unknown route {route!r}; this model serves {', '.join(ROUTES)}", 404)
    body = parse_body(CompletionBody if route == COMPLETIONS else ChatBody, _served_body(row, limits, served_names))
    tools, tool_choice, tool_grammar, echo = None, None, None, False
    if isinstance(body, CompletionBody):
        if body.suffix:
            raise RequestError("suffix is not supported (it asks for text inserted before it)")
        if body.echo and body.logprobs is not None:
            raise RequestError("echo with logprobs is not supported: the prompt's own logprobs are not computed; "
                               "ask for echo or for logprobs")
        prompt, echo = body.text, body.echo
    else:
        tools, tool_choice, tool_grammar = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls,
                                                       tool_call_parser)
        prompt = _chat_prompt(body.messages, tokenizer, chat_template, tools=tools)
    params = body.sampling(limits, len(tokenizer))
    if tool_grammar is not None:
        if params.grammar is not None:
            raise RequestError('"response_format" and a tool_choice that forces a call cannot both hold the answer')
        params.grammar = tool_grammar
    return TextRequest(check_prompt(prompt), params, body.stream, api=route, model=body.model,
                       include_usage=body.include_usage, n=body.n, echo=echo,
                       add_special_tokens=route == COMPLETIONS, tool_choice=tool_choice)


def _served_body(row: Dict[str, Any], limits: Limits, served_names: Sequence[str]) -> Any:
    """The row's body, once its model name (when it gives one) is one this server serves: a 404 comes first."""
    body = decode_body(row, limits)
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model not in served_names:
        raise RequestError(f"The model `{model}` does not exist; this server serves {', '.join(served_names)} "
                           "(handler.served_model_name)", 404)
    return body


def tokenizer_answer(row: Dict[str, Any], route: str, limits: Limits, tokenizer: Any, chat_template: Optional[str],
                     served_names: Sequence[str], max_model_len: Optional[int]) -> Dict[str, Any]:
    """vLLM's tokenize ({"prompt"} or {"messages"}) and detokenize ({"tokens"}) answers."""
    data = _served_body(row, limits, served_names)
    if route == DETOKENIZE:
        tokens = parse_body(Detokenize, data).tokens
        if any(t >= len(tokenizer) for t in tokens):
            raise RequestError(f'"tokens" must be a list of token ids from 0 to {len(tokenizer) - 1}')
        return {"prompt": tokenizer.decode(tokens)}
    if isinstance(data, dict) and "messages" in data:
        chat = parse_body(TokenizeChat, data)
        prompt = _chat_prompt(chat.messages, tokenizer, chat_template, chat.add_generation_prompt)
        special = chat.add_special_tokens
    else:
        completion = parse_body(TokenizeCompletion, data)
        prompt, special = completion.prompt, completion.add_special_tokens
    tokens = tokenizer(check_prompt(prompt), add_special_tokens=special)["input_ids"]
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens}


#: what a chat message may carry to the template besides role and content
_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id")


def _chat_prompt(messages: List[Dict[str, Any]], tokenizer: Any, chat_template: Optional[str],
                 add_generation_prompt: bool = True, tools: Optional[List[Dict[str, Any]]] = None) -> str:
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
        self._echoed: set = set()  # streaming with echo: the choices whose prompt went out

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
                text = self.request.prompt + result.text if self.request.echo else result.text
                choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs})
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
            if self.request.echo and choice not in self._echoed:  # the prompt comes first, as vLLM streams it
                text = self.request.prompt + text
                self._echoed.add(choice)
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
