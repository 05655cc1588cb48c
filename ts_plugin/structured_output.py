"""Structured output: an answer held to a JSON schema or a regular expression (OpenAI's `response_format`, TGI's
`grammar`), enforced per row by masking the logits on the rank that chooses the tokens.

The grammar library is llguidance. It builds a schema's parser lazily, so a request pays no compile step before
its first token (xgrammar and outlines compile or index each new schema first). It computes one row's mask in
well under a millisecond on CPU, from a matcher per row that advances with each chosen token: what a batch needs
whose rows join and leave at any step. It is small (one Rust extension) and vLLM ships it as its `guidance`
backend. Its `llguidance.torch.apply_token_bitmask_inplace` is not used: it is a `torch.compile`d kernel whose
first call compiles for half a minute on CPU; unpacking the bit mask here costs about as much as the mask.

A request's grammar travels as a `Grammar` (a schema or a pattern) in `SamplingParams.grammar`, checked against
this model's tokenizer when the request is parsed (every rank reaches the same verdict), so a schema the
library rejects is a 400 and never reaches a step.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Sequence

from .requests import RequestError

logger = logging.getLogger(__name__)

#: what OpenAI's json_object asks for: any JSON object
ANY_OBJECT: Dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Grammar:
    """What a request's answer must follow: a JSON schema (as JSON text) or a regular expression, and the request
    field it came from, which a refusal names."""
    kind: Literal["json_schema", "regex"]
    source: str
    origin: str = field(default="the grammar", compare=False)

    @classmethod
    def json_schema(cls, schema: Dict[str, Any], origin: str = "the grammar") -> "Grammar":
        return cls("json_schema", json.dumps(schema, sort_keys=True), origin)

    @classmethod
    def regex(cls, pattern: str, origin: str = "the grammar") -> "Grammar":
        return cls("regex", pattern, origin)


def strict_schema(schema: Any) -> Any:
    """OpenAI's `strict: true`: every object that does not say otherwise takes no properties beyond its own (JSON
    Schema's default, which a grammar follows to the letter, lets a model add keys until max_tokens)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {}
    for key, value in schema.items():
        if key in _SUBSCHEMAS:
            closed[key] = strict_schema(value)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            closed[key] = {name: strict_schema(sub) for name, sub in value.items()}
        else:
            closed[key] = value
    if closed.get("type") == "object" or "properties" in closed:
        closed.setdefault("additionalProperties", False)
    return closed


#: keywords whose value is a schema or a list of schemas, and those whose value maps names to schemas
_SUBSCHEMAS = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


class Grammars:
    """One model's grammar side: its token table for llguidance (`build_token_table`, at load, or else at the first
    structured request), request checks and one matcher per row. `compact_json`
    (handler.disable_any_whitespace) leaves JSON no free whitespace; by default it has JSON's own, as in vLLM.

    Example:
        grammars = Grammars(tokenizer, vocab_size=model.config.vocab_size, eos_ids=[tokenizer.eos_token_id])
        grammar = Grammar.json_schema({"type": "object"})
        grammars.check(grammar)
        row = grammars.row(grammar)
        logits = row.masked(logits)  # (1, vocab) -> the same with every token the grammar forbids at -inf
        row.accept(int(logits.argmax()))
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], compact_json: bool = False):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, list(eos_ids)
        self.compact_json = compact_json
        self._compiled = functools.lru_cache(maxsize=256)(self._compile)  # the same schema sent again

    @functools.cached_property
    def _ll_tokenizer(self) -> Any:
        import llguidance.hf

        # llguidance ends a grammar with the model's end of sequence, which ends the row here too
        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                            eos_token=self.eos_ids or None)

    def build_token_table(self) -> None:
        """Build llguidance's table of the tokenizer's tokens now, so that the first structured request does not
        wait for it."""
        self._ll_tokenizer  # noqa: B018 - a cached property: computing it is the point

    def _compile(self, grammar: Grammar) -> str:
        import llguidance

        if grammar.kind == "regex":
            return llguidance.grammar_from("regex", grammar.source)
        return llguidance.LLMatcher.grammar_from_json_schema(
            json.loads(grammar.source), defaults={"whitespace_flexible": not self.compact_json})

    def check(self, grammar: Grammar) -> None:
        """RequestError (400) naming the grammar's field where the library rejects it for this model."""
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(self._compiled(grammar), self._ll_tokenizer)
        if error:
            raise RequestError(f"{grammar.origin} cannot be followed: {error.strip()}")

    def row(self, grammar: Grammar) -> "RowGrammar":
        import llguidance

        return RowGrammar(llguidance.LLMatcher(self._ll_tokenizer, self._compiled(grammar)), self.vocab_size)


class RowGrammar:
    """One row's place in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int):
        import torch

        self.matcher = matcher
        self._words = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)
        self._bits = torch.arange(32, dtype=torch.int32)

    def masked(self, scores: Any) -> Any:
        """`scores` (1, vocab) with the tokens the grammar does not allow next at -inf."""
        import torch
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._words, 0)
        allowed = ((self._words.unsqueeze(-1) >> self._bits) & 1).bool().view(1, -1)
        width = scores.shape[-1]
        if allowed.shape[-1] < width:  # logits wider than the tokenizer's table: the extra ids are no text
            allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[-1]))
        return scores.masked_fill(~allowed[:, :width], float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            # unreachable with masked scores; the matcher then allows only the end of sequence, which ends the row
            logger.warning("the grammar refused token %d: %s", token, self.matcher.get_error())
