"""Structured output in-process: a grammar's answer follows its JSON schema or regex, alone, joining a running
batch and sampled, and greedy masked generation gives the tokens of single-process HF generate under the same
mask; a schema the grammar library rejects is a 400 that names the field."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from _llm import masked_greedy

from ts_plugin.continuous import ContinuousBatch, generate
from ts_plugin.kv_blocks import KVBlocks
from ts_plugin.engines.base import HFStepModel
from ts_plugin.requests import RequestError, SamplingParams
from ts_plugin.structured_output import Grammar, Grammars

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["answer", "count"], "additionalProperties": False}
PROMPTS = ["Is the sky blue? Reply in JSON.", "How many legs has a spider?", "Name a colour of the rainbow please"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("grammar") / request.param, arch=request.param)
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    eos = [hf.generation_config.eos_token_id]
    # compact JSON: a random-weight model is otherwise free to write whitespace until max_new_tokens
    return hf, tokenizer, eos, Grammars(tokenizer, hf.config.vocab_size, eos, compact_json=True)


@pytest.mark.parametrize("budget", [None, 8])
def test_greedy_answers_follow_the_schema_and_equal_masked_hf_generate(model, budget):
    hf, tokenizer, eos, grammars = model
    grammar = Grammar.json_schema(SCHEMA)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=40, grammar=grammar), SamplingParams(max_new_tokens=40),
              SamplingParams(max_new_tokens=40, grammar=grammar)]
    results = generate(HFStepModel(hf, torch.device("cpu")), tokenizer, prompts, params, 0, eos,
                       max_batched_tokens=budget, grammars=grammars)
    for result, ids in zip([results[0], results[2]], [prompts[0], prompts[2]]):
        assert result.finish_reason == "eos_token", result.text
        jsonschema.validate(json.loads(result.text), SCHEMA)
        assert result.token_ids == masked_greedy(hf, grammars, grammar, ids, 40)
    assert results[1].token_ids != masked_greedy(hf, grammars, grammar, prompts[1], 40)  # no grammar: free text


def test_a_row_with_a_grammar_joins_a_running_batch_and_sampled_rows_follow_it_too(model):
    hf, tokenizer, eos, grammars = model
    batch = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, eos, 0, KVBlocks(256),
                            grammars=grammars)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    batch.step([("free", ids[1], SamplingParams(max_new_tokens=30))])
    batch.step([])
    grammar = Grammar.json_schema(SCHEMA)
    digits = Grammar.regex(r"[0-9]{3}-[0-9]{4}")
    joining = [("json", ids[0], SamplingParams(max_new_tokens=40, grammar=grammar)),
               ("sampled", ids[2], SamplingParams(max_new_tokens=40, grammar=grammar, do_sample=True, seed=3,
                                                  temperature=1.5)),
               ("regex", ids[2], SamplingParams(max_new_tokens=20, grammar=digits))]
    results = {}
    while joining or len(batch):
        for request_id, output in batch.step(joining).items():
            if output.result is not None:
                results[request_id] = output.result
        joining = []
    for name in ("json", "sampled"):
        jsonschema.validate(json.loads(results[name].text), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", results["regex"].text)
    assert results["json"].token_ids == masked_greedy(hf, grammars, grammar, ids[0], 40)


def test_a_schema_the_library_rejects_is_a_400_that_names_the_field(model):
    _, _, _, grammars = model
    grammars.check(Grammar.json_schema(SCHEMA))
    for grammar in (Grammar.json_schema({"type": "nonsense"}, "response_format"),
                    Grammar.json_schema({"properties": {"a": {"$ref": "#/missing"}}}, "response_format"),
                    Grammar.regex("[0-9", "response_format")):
        with pytest.raises(RequestError, match="^response_format cannot be followed: .+") as caught:
            grammars.check(grammar)
        assert caught.value.status == 400


def test_json_whitespace_is_free_by_default_and_compact_where_asked(model):
    """The default grammar lets a row write JSON's whitespace (the random model then fills it); the masked loop
    still gives masked HF generate's tokens. Compact JSON (handler.disable_any_whitespace) holds none."""
    hf, tokenizer, eos, compact = model
    free = Grammars(tokenizer, hf.config.vocab_size, eos)
    grammar = Grammar.json_schema(SCHEMA)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    loose, tight = (generate(HFStepModel(hf, torch.device("cpu")), tokenizer, [ids],
                             [SamplingParams(max_new_tokens=30, grammar=grammar)], 0, eos, grammars=grammars)[0]
                    for grammars in (free, compact))
    assert loose.token_ids == masked_greedy(hf, free, grammar, ids, 30)
    assert tight.text == json.dumps(json.loads(tight.text), separators=(",", ":"))
    assert loose.text != tight.text
