"""What a request asks for, whatever its wire format: the prompt, the sampling parameters and the limits.
Shared by the request parsers (ts_plugin.handlers) and the generation loop; no torch import."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from .structured_output import Grammar


class RequestError(Exception):
    """A bad request: answered with `status` on every rank, nothing computed."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = False
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    include_stop: bool = True  # the stop string ends the text (TGI); OpenAI's routes leave it out
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence among the generated tokens
    logit_bias: Dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: Optional[int] = None  # each chosen token's log-probability, with this many alternatives
    grammar: Optional[Grammar] = None  # structured output: what the answer follows


@dataclass
class TextRequest:
    prompt: str
    params: SamplingParams
    stream: bool = False
    api: str = "tgi"  # the wire format: "tgi", or an OpenAI route (v1/completions, v1/chat/completions)
    model: Optional[str] = None  # OpenAI: the model name the client gave
    include_usage: bool = False  # OpenAI streaming: a usage event before [DONE]
    n: int = 1  # OpenAI's choices: rows generated for the same prompt
    echo: bool = False  # OpenAI completions: each choice's text starts with the prompt
    add_special_tokens: bool = True  # False for a chat template's text, which already holds them (BOS)
    tool_choice: Any = None  # OpenAI chat with tools: how the answer is read back (handlers._tools.ToolChoice)
    input_ids: List[int] = field(default_factory=list)  # filled by the handler's tokenizer


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int
    max_request_bytes: int


def check_prompt(prompt: str) -> str:
    """A prompt that is not blank and that the tokenizer can take: JSON's "\\ud800" escapes decode to lone
    surrogates, which are no UTF-8 text (the tokenizer raises TypeError on them)."""
    if not prompt.strip():
        raise RequestError("the prompt is empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(f"the prompt holds U+{ord(prompt[error.start]):04X} at character {error.start}, an unpaired "
                           "surrogate that is not text; send each character outside the BMP as one escape pair "
                           "or as UTF-8") from None
    return prompt


def check_lengths(prompt_tokens: int, params: SamplingParams, max_length: Optional[int], max_positions: Optional[int],
                  kv_tokens: Optional[int] = None) -> None:
    """Reject prompts that do not fit; `max_length` is the configured bound, `max_positions` the model's and
    `kv_tokens` the KV positions one request may hold (handler.kv_cache_memory)."""
    for bound, what in ((max_length, "handler.max_length"), (max_positions, "the model's maximum positions"),
                        (kv_tokens, "the tokens handler.kv_cache_memory holds for one request")):
        if bound is None:
            continue
        if prompt_tokens >= bound:
            raise RequestError(f"the prompt has {prompt_tokens} tokens; {what} is {bound}", 413)
        if prompt_tokens + params.max_new_tokens > bound:
            raise RequestError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds {what} ({bound}); "
                f"ask for at most {bound - prompt_tokens} new tokens", 422)


def stop_span(text: str, stops: Sequence[str]) -> Optional[Tuple[int, int]]:
    """(start, end) of the stop sequence that ends first in `text`, or None."""
    spans = [(text.find(s), text.find(s) + len(s)) for s in stops if s in text]
    return min(spans, key=lambda span: span[1]) if spans else None
