"""The text-generation-inference shape: a row's body read and checked (the body models are in `_bodies`), and
the answer and stream as TGI sends them."""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Sequence

from ..requests import Limits, RequestError, SamplingParams, TextRequest, check_prompt
from ._bodies import TGIBody, parse_body


#: TorchServe reads a form-encoded body (curl -d without a Content-Type) as form fields, which reach no handler
FORM_BODY = ("the request reached the model without a body: a form-encoded one (as `curl -d` sends without "
             "`-H 'Content-Type: application/json'`) is read as form fields; send JSON with that header, or text")


def _body(row: Dict[str, Any]) -> Any:
    for key in ("body", "data"):
        if row.get(key) is not None:
            return row[key]
    raise RequestError(FORM_BODY)


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

    Accepts `{"inputs": str, "parameters": {...}, "stream": bool}` (`_bodies.TGIBody`) or a plain-text body.
    """
    body = decode_body(row, limits)
    if isinstance(body, str):
        return TextRequest(check_prompt(body), SamplingParams(max_new_tokens=limits.max_new_tokens))
    request = parse_body(TGIBody, body)
    params = request.parameters.sampling(limits)
    if request.stream:
        params.logprobs = 0  # TGI's stream events carry each token's id and logprob
    return TextRequest(check_prompt(request.inputs), params, request.stream)


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
        # a call's text goes with its last token (a call may collect several steps);
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
