"""The request bodies of every route, as pydantic models: TGI's `{"inputs", "parameters", "stream"}`, OpenAI's
completions and chat completions, and vLLM's tokenize and detokenize. Each generating body gives the one
`SamplingParams` (`sampling`). Parsing is pure and deterministic, so every rank reaches the same verdict on
the same bytes before any collective; a refusal is a RequestError that names the field and the reason.

JSON `null` means "not given" in every field, as OpenAI's clients send it.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Dict, List, Literal, Optional, Type, TypeVar, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..requests import Limits, RequestError, SamplingParams
from ..structured_output import ANY_OBJECT, Grammar, strict_schema

MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default max_logprobs
MAX_CHOICES = 8  # n: each choice is a row of the batch

Number = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]


class _Body(BaseModel):
    # strict: "5" is no number and 1 is no boolean; unknown fields are refused, not ignored
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data


def _stop_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


#: a stop string or a list of them, as a list
Stops = Annotated[List[Annotated[str, Field(min_length=1)]], BeforeValidator(_stop_list),
                  Field(max_length=MAX_STOP_SEQUENCES)]


# --- TGI ------------------------------------------------------------------------------------------------------------

class TGIGrammar(_Body):
    type: Literal["json", "regex"]
    value: Union[str, Dict[str, Any]]


class TGIParameters(_Body):
    max_new_tokens: Optional[int] = Field(None, ge=1)
    temperature: Number = Field(1.0, gt=0, le=100)
    top_k: int = Field(0, ge=0, le=1_000_000)
    top_p: Number = Field(1.0, gt=0, le=1)
    do_sample: bool = False
    seed: Optional[Seed] = None
    stop: Stops = []
    repetition_penalty: Number = Field(1.0, gt=0, le=100)
    grammar: Optional[TGIGrammar] = None
    # TGI's, accepted for compatibility and not acted on
    details: Any = None
    decoder_input_details: Any = None
    return_full_text: Any = None
    truncate: Any = None
    watermark: Any = None
    best_of: Any = None
    typical_p: Any = None

    def sampling(self, limits: Limits) -> SamplingParams:
        return SamplingParams(max_new_tokens=_max_new_tokens(self.max_new_tokens, "parameters.max_new_tokens", limits),
                              temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              do_sample=self.do_sample, seed=self.seed, stop=self.stop,
                              repetition_penalty=self.repetition_penalty, grammar=self._grammar())

    def _grammar(self) -> Optional[Grammar]:
        """TGI's {"type": "json", "value": a JSON schema (or its text)} or {"type": "regex", "value": a pattern}."""
        if self.grammar is None:
            return None
        value = self.grammar.value
        if self.grammar.type == "regex":
            if not isinstance(value, str):
                raise RequestError("parameters.grammar.value must be a regular expression for type regex")
            return Grammar.regex(value, "parameters.grammar")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise RequestError(f"parameters.grammar.value is not JSON: {err.msg}") from None
        if not isinstance(value, dict):
            raise RequestError("parameters.grammar.value must be a JSON schema object for type json")
        return Grammar.json_schema(value, "parameters.grammar")


class TGIBody(_Body):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


# --- OpenAI ---------------------------------------------------------------------------------------------------------

class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Dict[str, Any] = Field(default_factory=lambda: dict(ANY_OBJECT), alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    def grammar(self) -> Optional[Grammar]:
        """None for text, any JSON object for json_object, the schema for json_schema (enforced whether or not it
        says strict, as vLLM does; strict also closes its objects to keys they do not list, as OpenAI's strict
        mode requires of a schema)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return Grammar.json_schema(ANY_OBJECT, "response_format")
        if self.json_schema is None:
            raise RequestError('response_format of type json_schema needs "json_schema": {"name": ..., "schema": '
                               "{...}}")
        schema = self.json_schema.schema_
        return Grammar.json_schema(strict_schema(schema) if self.json_schema.strict else schema,
                                   "response_format.json_schema.schema")


class _OpenAIBody(_Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    stop: Stops = []
    seed: Optional[Seed] = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    logit_bias: Dict[str, Annotated[Number, Field(ge=-100, le=100)]] = {}
    repetition_penalty: Number = Field(1.0, gt=0, le=100)  # vLLM's extra
    response_format: Optional[ResponseFormat] = None

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, limits: Limits, vocab_size: int) -> SamplingParams:
        # OpenAI samples unless temperature is 0, which means greedy whatever top_p says
        sampling = self.temperature > 0
        return SamplingParams(
            max_new_tokens=_max_new_tokens(self._max_tokens(), "max_tokens", limits),
            temperature=self.temperature if sampling else 1.0, top_p=self.top_p if sampling else 1.0,
            do_sample=sampling, seed=self.seed, stop=self.stop, include_stop=False,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=self._token_bias(vocab_size),
            logprobs=self._logprobs(),
            grammar=self.response_format.grammar() if self.response_format is not None else None)

    def _max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def _logprobs(self) -> Optional[int]:
        return None

    def _token_bias(self, vocab_size: int) -> Dict[int, float]:
        """OpenAI's {"token id": bias from -100 to 100}."""
        bias = {}
        for key, amount in self.logit_bias.items():
            token = int(key) if key.isdigit() else -1
            if not 0 <= token < vocab_size:
                raise RequestError(f"logit_bias key {key!r} is not a token id from 0 to {vocab_size - 1}")
            bias[token] = amount
        return bias


class CompletionBody(_OpenAIBody):
    prompt: Union[str, Annotated[List[str], Field(min_length=1, max_length=1)]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=1)

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def _logprobs(self) -> Optional[int]:
        return self.logprobs


class ChatBody(_OpenAIBody):
    messages: List[Dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None

    def _max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError('"top_logprobs" needs "logprobs": true')
        return (self.top_logprobs or 0) if self.logprobs else None


# --- vLLM's tokenizer routes ----------------------------------------------------------------------------------------

class TokenizeCompletion(_Body):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChat(_Body):
    model: Optional[str] = None
    messages: List[Dict[str, Any]] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False


class Detokenize(_Body):
    model: Optional[str] = None
    tokens: List[Annotated[int, Field(ge=0)]]


# --- parsing --------------------------------------------------------------------------------------------------------

BodyT = TypeVar("BodyT", bound=BaseModel)


def parse_body(model: Type[BodyT], data: Any, prefix: str = "") -> BodyT:
    """`data` as `model`, or a RequestError naming the first field that is wrong and why."""
    if not isinstance(data, dict):
        raise RequestError(f"the JSON body must be an object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _request_error(model, error.errors(), prefix) from None


def _max_new_tokens(asked: Optional[int], field: str, limits: Limits) -> int:
    if asked is not None and asked > limits.max_new_tokens:
        raise RequestError(f"{field} is {asked}; this model allows at most {limits.max_new_tokens}")
    return limits.max_new_tokens if asked is None else asked


_REASONS = {"string_type": "must be a string", "bool_type": "must be true or false", "int_type": "must be an integer",
            "float_type": "must be a number", "dict_type": "must be an object", "model_type": "must be an object",
            "model_attributes_type": "must be an object", "list_type": "must be a list",
            "finite_number": "must be a finite number", "missing": "is required"}


def _request_error(model: Type[BaseModel], errors: List[Dict[str, Any]], prefix: str) -> RequestError:
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        parent = unknown[0]["loc"][:-1]
        names = sorted(str(e["loc"][-1]) for e in unknown if e["loc"][:-1] == parent)
        where = _field(parent, prefix)
        kind = "parameter" if where.endswith("parameters") else "field"
        allowed = ", ".join(_fields_at(model, parent))
        return RequestError(f"unknown {kind}(s) {', '.join(names)}{f' in {where}' if where and kind == 'field' else ''}"
                            f"; allowed: {allowed}")
    error = errors[0]
    field = _field(tuple(p for p in error["loc"] if not _is_union_tag(p)), prefix)
    reason = _REASONS.get(error["type"]) or error["msg"].replace("Input should be", "must be")
    if error["type"] == "missing":
        return RequestError(f"{field} {reason}")
    return RequestError(f"{field} is {_shown(error.get('input'))}; it {reason}")


def _field(loc: tuple, prefix: str) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return f"{prefix}.{text}" if prefix and text else (text or prefix)


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member it tried, e.g. ('prompt', 'str') or ('prompt', 'list[str]')
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)


def _fields_at(model: Type[BaseModel], loc: tuple) -> List[str]:
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        model = next(arg for arg in (annotation, *getattr(annotation, "__args__", ()))
                     if isinstance(arg, type) and issubclass(arg, BaseModel))
    return [info.alias or name for name, info in model.model_fields.items()]


def _shown(value: Any) -> str:
    try:  # ASCII: a lone surrogate in a bad value must not make the error itself unsendable
        text = json.dumps(value, default=repr)
    except (RecursionError, ValueError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."
