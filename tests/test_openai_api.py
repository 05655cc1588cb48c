"""OpenAI's routes: the parser and the bodies in-process, then the real `openai` client against the real TorchServe
(completions and chat, streamed and not), static and continuous batching, every parallelType."""
from __future__ import annotations

import json
import re

import pytest

from _llm import PROMPTS, REPO, masked_greedy, reference_text, serving, tiny_llama_and_store
from ts_plugin.generation import SequenceResult
from ts_plugin.handlers._openai import (CHAT, COMPLETIONS, DETOKENIZE, TOKENIZE, OpenAIFormat, parse_openai,
                                        tokenizer_answer)
from ts_plugin.requests import Limits, RequestError
from ts_plugin.testing import archive_model, java_available, reference_answers, write_config

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
LIMITS = Limits(max_new_tokens=32, max_request_bytes=10_000)
SERVED = ("m", "other-name")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from ts_plugin.testing import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def row(body) -> dict:
    return {"body": json.dumps(body).encode()}


def parse(tokenizer, body, route=COMPLETIONS, template=TEMPLATE):
    return parse_openai(row(body), route, LIMITS, tokenizer, template, SERVED)


def test_completions_body_becomes_a_request(tokenizer):
    request = parse(tokenizer, {"model": "m", "prompt": ["hello"], "max_tokens": 5, "temperature": 0, "stop": "x",
                                "seed": 3, "stream": True, "stream_options": {"include_usage": True}})
    assert (request.prompt, request.params.max_new_tokens, request.params.stop, request.params.seed) == \
        ("hello", 5, ["x"], 3)
    assert not request.params.do_sample and request.stream and request.include_usage and request.api == COMPLETIONS
    assert not request.params.include_stop and request.add_special_tokens
    sampled = parse(tokenizer, {"prompt": "hi", "temperature": 0.7, "top_p": 0.9})
    assert sampled.params.do_sample and sampled.params.temperature == 0.7 and sampled.params.top_p == 0.9
    assert sampled.params.max_new_tokens == LIMITS.max_new_tokens


def test_chat_goes_through_the_chat_template(tokenizer):
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]}
    request = parse(tokenizer, body, CHAT)
    assert request.prompt == "system: be brief\nuser: hello\nassistant:"
    assert not request.add_special_tokens  # the template's text holds them
    with pytest.raises(RequestError, match="no chat template .* handler.chat_template"):
        parse(tokenizer, body, CHAT, template=None)


NAMED_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}{% if m.name %}({{ m.name }}){% endif %}: {{ m['content'] }}"
                  "{% for call in m.tool_calls or [] %}[call {{ call.id }} {{ call.function.name }}]{% endfor %}"
                  "{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}{{ '\\n' }}{% endfor %}assistant:")


def test_chat_content_parts_names_and_tool_turns_reach_the_template(tokenizer):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}
    body = {"messages": [
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"}]}
    request = parse(tokenizer, body, CHAT, NAMED_TEMPLATE)
    assert request.prompt == "user(ann): first\nsecond\nassistant: [call c1 add]\ntool: 2[for c1]\nassistant:"
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "see"},
                                                       {"type": "image_url", "image_url": {"url": "x"}}]}]}
    with pytest.raises(RequestError, match=r"messages\[0\].content\[1\] is of type 'image_url'.*text only"):
        parse(tokenizer, image, CHAT)


def test_temperature_0_is_greedy_whatever_top_p_says(tokenizer):
    from ts_plugin.generation import new_sequence

    request = parse(tokenizer, {"prompt": "hi", "temperature": 0, "top_p": 0.5})
    assert not new_sequence([1], request.params, 0).sampling


def test_penalties_and_logit_bias_become_sampling_params(tokenizer):
    params = parse(tokenizer, {"prompt": "hi", "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
                               "logit_bias": {"7": 100, "9": -50.5}}).params
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -1.0, 1.2)
    assert params.logit_bias == {7: 100.0, 9: -50.5}


def test_an_unknown_model_name_gets_404_and_a_missing_one_is_the_served_model(tokenizer):
    with pytest.raises(RequestError, match="`gpt-4o` does not exist.*m, other-name") as error:
        parse(tokenizer, {"model": "gpt-4o", "prompt": "hi"})
    assert error.value.status == 404
    assert parse(tokenizer, {"model": "other-name", "prompt": "hi"}).model == "other-name"
    assert parse(tokenizer, {"prompt": "hi"}).prompt == "hi"


def test_tokenize_and_detokenize_as_vllm_answers_them(tokenizer):
    def answer(route, body):
        return tokenizer_answer(row(body), route, LIMITS, tokenizer, TEMPLATE, SERVED, 256)

    ids = tokenizer("hello world")["input_ids"]
    assert answer(TOKENIZE, {"model": "m", "prompt": "hello world"}) == {"count": len(ids), "max_model_len": 256,
                                                                         "tokens": ids}
    chat = answer(TOKENIZE, {"messages": [{"role": "user", "content": "hello"}]})
    assert chat["tokens"] == tokenizer("user: hello\nassistant:", add_special_tokens=False)["input_ids"]
    assert answer(DETOKENIZE, {"tokens": ids}) == {"prompt": "hello world"}
    with pytest.raises(RequestError, match="token ids from 0"):
        answer(DETOKENIZE, {"tokens": [len(tokenizer)]})
    with pytest.raises(RequestError, match="does not exist"):
        answer(TOKENIZE, {"model": "nope", "prompt": "hi"})


@pytest.mark.parametrize("route, body, status, words", [
    (COMPLETIONS, {"prompt": "hi", "n": 9}, 400, "n is 9"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "logprobs is 21"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "needs \"logprobs\": true"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 33}, 400, "at most 32"),
    (COMPLETIONS, {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias key 'x'"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"1": 101}}, 400,
     "logit_bias.1 is 101; it must be less than or equal to 100"),
    (COMPLETIONS, {"prompt": "hi", "echo": True, "logprobs": 1}, 400, "echo with logprobs is not supported"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 2}, 400, "best_of is 2"),
    (COMPLETIONS, {"prompt": "hi", "suffix": "x"}, 400, "suffix is not supported"),
    (COMPLETIONS, {"prompt": "hi", "stop": ["a"] * 5}, 400, "at most 4"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "bogus": 1}, 400, "bogus"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "content"),
    ("v1/embeddings", {"input": "hi"}, 404, "v1/completions"),
])
def test_bad_bodies_are_refused_with_the_reason(tokenizer, route, body, status, words):
    with pytest.raises(RequestError, match=words) as error:
        parse(tokenizer, body, route)
    assert error.value.status == status


def test_logprobs_take_openais_shapes_for_completions_and_chat(tokenizer):
    ids = tokenizer("hello world")["input_ids"][:2]
    texts = [tokenizer.decode([i]) for i in ids]
    entries = [(ids[0], -0.5, [(ids[0], -0.5), (ids[1], -1.5)]), (ids[1], -0.25, [(ids[1], -0.25), (ids[0], -2.0)])]
    result = SequenceResult("".join(texts), ids, 3, "length", 0.1, 0.2, entries)
    completion = parse(tokenizer, {"prompt": "hi", "logprobs": 2})
    assert completion.params.logprobs == 2
    assert OpenAIFormat(completion, "r", "m", tokenizer).whole([result])["choices"][0]["logprobs"] == {
        "tokens": texts, "token_logprobs": [-0.5, -0.25], "text_offset": [0, len(texts[0])],
        "top_logprobs": [{texts[0]: -0.5, texts[1]: -1.5}, {texts[1]: -0.25, texts[0]: -2.0}]}
    chat = parse(tokenizer, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1},
                 CHAT)
    assert chat.params.logprobs == 1
    events = OpenAIFormat(chat, "r", "m", tokenizer).event(texts[0], None, entries[:1])
    content = json.loads(events[len("data: "):])["choices"][0]["logprobs"]["content"]
    assert content == [{"token": texts[0], "bytes": list(texts[0].encode()), "logprob": -0.5,
                        "top_logprobs": [{"token": texts[0], "bytes": list(texts[0].encode()), "logprob": -0.5},
                                         {"token": texts[1], "bytes": list(texts[1].encode()), "logprob": -1.5}]}]
    assert parse(tokenizer, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, CHAT).params.logprobs == 0
    assert parse(tokenizer, {"prompt": "hi"}).params.logprobs is None


def test_echo_puts_the_prompt_before_each_choices_text(tokenizer):
    result = SequenceResult(" there", [5], 2, "length", 0.1, 0.2)
    whole = OpenAIFormat(parse(tokenizer, {"prompt": "hi", "echo": True, "n": 2}), "r", "m", tokenizer)
    assert [c["text"] for c in whole.whole([result, result])["choices"]] == ["hi there", "hi there"]
    streamed = OpenAIFormat(parse(tokenizer, {"prompt": "hi", "echo": True, "n": 2, "stream": True}), "r", "m",
                            tokenizer)
    texts = [(choice, streamed.event(piece, None, (), choice)) for choice, piece in ((0, " th"), (1, " t"), (0, "ere"))]
    assert [(choice, json.loads(event[len("data: "):])["choices"][0]["text"]) for choice, event in texts] == [
        (0, "hi th"), (1, "hi t"), (0, "ere")]


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}
TOOLS_TEMPLATE = ("{% if tools %}tools: {{ tools | map(attribute='function.name') | join(', ') }}\n{% endif %}"
                  + TEMPLATE)


def test_tools_reach_the_template_and_forced_calls_get_a_grammar(tokenizer):
    import jsonschema

    messages = [{"role": "user", "content": "weather?"}]
    auto = parse_openai(row({"messages": messages, "tools": [WEATHER, CLOCK]}), CHAT, LIMITS, tokenizer,
                        TOOLS_TEMPLATE, SERVED, tool_call_parser="hermes")
    assert auto.prompt == "tools: weather, clock\nuser: weather?\nassistant:"
    assert auto.tool_choice.mode == "auto" and auto.params.grammar is None
    with pytest.raises(RequestError, match="handler.tool_call_parser"):
        parse(tokenizer, {"messages": messages, "tools": [WEATHER]}, CHAT)
    none = parse(tokenizer, {"messages": messages, "tools": [WEATHER], "tool_choice": "none"}, CHAT, TOOLS_TEMPLATE)
    assert none.tool_choice is None and none.prompt.startswith("tools: weather")
    required = parse(tokenizer, {"messages": messages, "tools": [WEATHER, CLOCK], "tool_choice": "required"}, CHAT)
    named = parse(tokenizer, {"messages": messages, "tools": [WEATHER, CLOCK],
                              "tool_choice": {"type": "function", "function": {"name": "weather"}}}, CHAT)
    assert (required.tool_choice.mode, named.tool_choice.function) == ("required", "weather")
    # the grammars hold what the schemas say: the calls list, and the named function's arguments
    grammar = json.loads(required.params.grammar.source)
    jsonschema.validate([{"name": "weather", "parameters": {"city": "Rome"}}, {"name": "clock", "parameters": {}}],
                        grammar)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "weather", "parameters": {"city": "Oslo"}}], grammar)
    assert json.loads(named.params.grammar.source) == WEATHER["function"]["parameters"]
    assert named.params.grammar.origin == "tools[0].function.parameters"  # what a refused schema's 400 names


def test_strict_schemas_close_their_objects_as_openai_requires(tokenizer):
    loose = {"type": "object", "properties": {"city": {"type": "string"},
                                              "where": {"type": "object", "properties": {"lat": {"type": "number"}}}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": loose}}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert json.loads(parse(tokenizer, {**chat, "response_format": fmt}, CHAT).params.grammar.source) == loose
    strict = json.loads(parse(tokenizer, {**chat, "response_format": {
        **fmt, "json_schema": {**fmt["json_schema"], "strict": True}}}, CHAT).params.grammar.source)
    assert strict["additionalProperties"] is False and strict["properties"]["where"]["additionalProperties"] is False
    tool = {"type": "function", "function": {"name": "f", "parameters": loose, "strict": True}}
    named = parse(tokenizer, {**chat, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}}},
                  CHAT)
    assert json.loads(named.params.grammar.source) == strict


@pytest.mark.parametrize("body, words", [
    ({"tool_choice": "required"}, "needs \"tools\""),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, r"tools\[0\] must be"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "appears twice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "one of weather"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot both"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
])
def test_bad_tools_and_formats_are_refused_with_the_reason(tokenizer, body, words):
    with pytest.raises(RequestError, match=words):
        parse(tokenizer, {"messages": [{"role": "user", "content": "hi"}], **body}, CHAT)


@pytest.mark.parametrize("parser, text, content, calls", [
    ("hermes", 'Let me see. <tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>',
     "Let me see.", [("weather", {"city": "Rome"})]),
    ("hermes", "No call here.", "No call here.", []),
    ("hermes", '<tool_call>{"name": "weather", "arguments": {"ci', '<tool_call>{"name": "weather", "arguments": {"ci',
     []),
    ("llama3_json", '<|python_tag|>{"name": "weather", "parameters": {"city": "Paris"}}', None,
     [("weather", {"city": "Paris"})]),
    ("mistral", '[TOOL_CALLS] [{"name": "clock", "arguments": {}}, {"name": "weather", "arguments": {"city": "Rome"}}]',
     None, [("clock", {}), ("weather", {"city": "Rome"})]),
])
def test_auto_tool_calls_are_read_from_the_model_familys_markup(parser, text, content, calls):
    from ts_plugin.handlers._tools import ToolChoice, tool_calls

    left, found = tool_calls(text, ToolChoice("auto", parser=parser))
    assert left == content
    assert [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in found] == calls
    assert all(call["id"].startswith("chatcmpl-tool-") and call["type"] == "function" for call in found)


def test_forced_calls_come_back_as_tool_calls_whole_and_streamed(tokenizer):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, CLOCK], "tool_choice": "required"}
    text = '[{"name": "weather", "parameters": {"city": "Rome"}}]'
    result = SequenceResult(text, [5, 6], 4, "eos_token", 0.1, 0.2)
    whole = OpenAIFormat(parse(tokenizer, body, CHAT), "r", "m", tokenizer).whole([result])["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["message"]["tool_calls"]] \
        == [("weather", {"city": "Rome"})]
    streamed = OpenAIFormat(parse(tokenizer, {**body, "stream": True}, CHAT), "r", "m", tokenizer)
    assert streamed.event(text[:10]) == ""  # held until the calls can be read
    events = [json.loads(line[len("data: "):]) for line in streamed.event(text[10:], result).split("\n\n")
              if line and line != "data: [DONE]"]
    delta = events[0]["choices"][0]["delta"]
    assert events[0]["choices"][0]["finish_reason"] == "tool_calls" and delta["role"] == "assistant"
    assert delta["tool_calls"][0]["index"] == 0 and delta["tool_calls"][0]["function"]["name"] == "weather"
    named = {**body, "tool_choice": {"type": "function", "function": {"name": "weather"}}}
    choice = OpenAIFormat(parse(tokenizer, named, CHAT), "r", "m", tokenizer).whole(
        [SequenceResult('{"city": "Paris"}', [5], 4, "eos_token", 0.1, 0.2)])["choices"][0]
    assert choice["finish_reason"] == "stop"  # as OpenAI answers a named function
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    cut = OpenAIFormat(parse(tokenizer, named, CHAT), "r", "m", tokenizer).whole(
        [SequenceResult('{"city": "Pa', [5], 4, "length", 0.1, 0.2)])["choices"][0]
    assert (cut["finish_reason"], cut["message"]) == ("length", {"role": "assistant", "content": '{"city": "Pa'})


def test_stream_events_end_with_the_finish_usage_and_done(tokenizer):
    request = parse(tokenizer, {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                "stream_options": {"include_usage": True}}, CHAT)
    answer = OpenAIFormat(request, "r1", "m", tokenizer)
    first = answer.event("Hel")
    result = SequenceResult("Hello", [5, 6], 4, "eos_token", 0.1, 0.2)
    last = answer.event("lo", result)
    events = [line[len("data: "):] for line in (first + last).split("\n\n") if line]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert chunks[1]["choices"][0] == {"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop", "logprobs": None}
    assert chunks[2]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                                  "prompt_tokens_details": {"cached_tokens": 0}}
    assert all(c["id"] == "chatcmpl-r1" and c["object"] == "chat.completion.chunk" for c in chunks)


# --- the real openai client against the real TorchServe --------------------------------------------------------

MODELS = {  # name -> (example, continuous batching)
    "oa-custom": ("custom", False),
    "oa-custom-cb": ("custom", True),
    "oa-tp-cb": ("tp", True),
    "oa-pp-cb": ("pp", True),
    "oa-pptp-cb": ("pptp", True),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not java_available():
        pytest.skip("TorchServe needs Java 11+")
    root = tmp_path_factory.mktemp("oa")
    model_dir, store = tiny_llama_and_store(root)
    for name, (example, continuous) in MODELS.items():
        extra = {"continuousBatching": True, "maxBatchDelay": 50} if continuous else {}
        config = write_config(root / f"{name}.yaml", REPO / f"examples/{example}/model-config.yaml",
                              batchSize=4, deviceType="cpu",
                              # compact JSON: a random-weight model is otherwise free to write whitespace until the end
                              handler={"max_new_tokens": 32, "chat_template": TEMPLATE, "disable_any_whitespace": True},
                              **extra)
        archive_model(store, name, config, model_dir)
    with serving(root / "ts", store, MODELS) as ts:
        yield ts, model_dir


def client(ts, name):
    from openai import OpenAI

    return OpenAI(base_url=f"{ts.inference_url}/predictions/{name}/1.0/v1", api_key=ts.key or "unused", max_retries=0,
                  timeout=60)


@pytest.mark.serve
@pytest.mark.parametrize("name", list(MODELS))
def test_openai_client_completions_and_chat_streamed_and_not(server, name):
    ts, model_dir = server
    api = client(ts, name)
    completion = api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    expected = reference_text(model_dir, PROMPTS[0], 12)
    assert completion.choices[0].text == expected
    assert completion.usage.completion_tokens <= 12 and completion.usage.prompt_tokens > 0
    streamed = api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected
    # echo: the prompt first, then the same answer, whole and streamed
    echoed = api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, echo=True, n=2)
    assert [choice.text for choice in echoed.choices] == [PROMPTS[0] + expected] * 2
    streamed = api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                      echo=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == PROMPTS[0] + expected

    messages = [{"role": "user", "content": "hello world"}]
    chat_prompt = "user: hello world\nassistant:"
    chat = api.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == reference_text(model_dir, chat_prompt, 10)
    assert chat.choices[0].finish_reason in ("length", "stop")
    stream = api.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


@pytest.mark.serve
@pytest.mark.parametrize("name", ["oa-custom", "oa-tp-cb"])
def test_bad_openai_bodies_get_4xx_and_the_next_request_works(server, name):
    from openai import BadRequestError

    ts, model_dir = server
    api = client(ts, name)
    with pytest.raises(BadRequestError, match="n is 9"):
        api.completions.create(model=name, prompt="hi", max_tokens=4, n=9)
    with pytest.raises(BadRequestError, match="at most 32"):
        api.completions.create(model=name, prompt="hi", max_tokens=500)
    assert api.completions.create(model=name, prompt=PROMPTS[1], max_tokens=6, temperature=0).choices[0].text == \
        reference_text(model_dir, PROMPTS[1], 6)
    models = ts.predict(f"{name}/1.0/v1/models", b"")
    assert models.status_code == 200 and models.json()["data"][0]["id"]


@pytest.mark.serve
@pytest.mark.parametrize("name", list(MODELS))
def test_what_real_clients_send_is_answered_as_vllm_answers_it(server, name):
    """Content parts, temperature 0 with top_p, stop strings left out (streamed too), logit_bias, an unknown model,
    and the tokenizer's routes, through the real openai client."""
    from openai import NotFoundError

    ts, model_dir = server
    api = client(ts, name)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]
    chat = api.chat.completions.create(model=name, messages=parts, max_tokens=8, temperature=0, top_p=0.5)
    assert chat.choices[0].message.content == reference_text(model_dir, "user: hello\nworld\nassistant:", 8)

    whole = reference_text(model_dir, PROMPTS[2], 16)
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    assert stop.strip(), whole
    cut = api.completions.create(model=name, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (whole[:whole.find(stop)], "stop")
    streamed = api.completions.create(model=name, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=stop,
                                      stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == whole[:whole.find(stop)]

    token = ts.predict(f"{name}/1.0/v1/tokenize", {"model": name, "prompt": " the"}).json()["tokens"][-1]
    forced = api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                    logit_bias={str(token): 100})
    expected = ts.predict(f"{name}/1.0/v1/detokenize", {"tokens": [token] * 3}).json()["prompt"]
    assert (forced.choices[0].text, forced.usage.completion_tokens) == (expected, 3)

    with pytest.raises(NotFoundError, match="does not exist"):
        api.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert api.models.list().data[0].id == name


def test_a_chat_prompt_is_the_templates_own_token_ids_with_one_bos(tmp_path):
    """The template writes BOS; tokenizing its text with special tokens added would give a second one."""
    from tokenizers.processors import TemplateProcessing

    from ts_plugin.config import validate_text
    from ts_plugin.handlers import LLMHandler
    from ts_plugin.testing import make_tokenizer
    from ts_plugin.requests import TextRequest

    tokenizer = make_tokenizer(tmp_path)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tokenizer("hi")["input_ids"][0] == 1  # this tokenizer adds BOS, as Llama 3's does
    template = "<s>" + TEMPLATE
    handler = LLMHandler()
    handler.config = validate_text("handler:\n  max_new_tokens: 8\n").config
    handler.config.handler.chat_template = template
    handler.limits, handler.tokenizer, handler.max_positions = LIMITS, tokenizer, 256
    messages = [{"role": "user", "content": "hello"}]
    chat, completion = handler.preprocess([row({"messages": messages}), row({"prompt": "hello"})],
                                          [CHAT, COMPLETIONS])
    assert isinstance(chat, TextRequest) and isinstance(completion, TextRequest)
    assert chat.input_ids == tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                           tokenize=True, return_dict=True)["input_ids"]
    assert chat.input_ids.count(1) == 1 and completion.input_ids[0] == 1


def reference_logprobs(model_dir, prompt: str, token_ids) -> list:
    """Single-process log-probabilities of `token_ids` after `prompt` (greedy: no processor changes them)."""
    import torch

    from ts_plugin.testing.packaging import _reference_model

    model, tokenizer = _reference_model(str(model_dir))
    prompt_ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + list(token_ids)])).logits[0]
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1:-1].float(), -1)
    return [float(logprobs[i, token]) for i, token in enumerate(token_ids)]


@pytest.mark.serve
@pytest.mark.parametrize("name", list(MODELS))
def test_logprobs_are_those_of_the_model_in_one_process(server, name):
    ts, model_dir = server
    api = client(ts, name)
    completion = api.completions.create(model=name, prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=2)
    choice = completion.choices[0]
    generated, text = reference_answers(model_dir, [(PROMPTS[1], 8)])[0]
    assert choice.text == text and len(choice.logprobs.token_logprobs) == len(generated)
    assert choice.logprobs.token_logprobs == pytest.approx(reference_logprobs(model_dir, PROMPTS[1], generated),
                                                           abs=1e-3)
    for logprob, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the top one

    messages = [{"role": "user", "content": "hello world"}]
    whole = api.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                        top_logprobs=1)
    streamed = [chunk.choices[0].logprobs.content for chunk in
                api.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                            top_logprobs=1, stream=True)
                if chunk.choices and chunk.choices[0].logprobs]
    flat = [entry for entries in streamed for entry in entries]
    assert [e.logprob for e in flat] == pytest.approx([e.logprob for e in whole.choices[0].logprobs.content], abs=1e-5)
    assert len(flat) == whole.usage.completion_tokens and all(len(e.top_logprobs) == 1 for e in flat)


@pytest.mark.serve
@pytest.mark.parametrize("name", ["oa-custom", "oa-tp-cb", "oa-pp-cb"])
def test_n_choices_are_rows_of_the_batch_each_its_own_sample(server, name):
    """n: 3 seeded gives 3 choices, each the answer of its own seed (seed + choice) asked alone; greedy n: 2 gives
    the greedy answer twice; streamed choices add up to the same texts and one usage."""
    ts, model_dir = server
    api = client(ts, name)
    several = api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7, n=3)
    singles = [api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7 + choice)
               for choice in range(3)]
    alone = [single.choices[0].text for single in singles]
    assert [choice.index for choice in several.choices] == [0, 1, 2]
    assert [choice.text for choice in several.choices] == alone and len(set(alone)) > 1
    assert several.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
    greedy = api.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello world"}],
                                         max_tokens=6, temperature=0, n=2)
    expected = reference_text(model_dir, "user: hello world\nassistant:", 6)
    assert [choice.message.content for choice in greedy.choices] == [expected, expected]
    texts = {0: "", 1: "", 2: ""}
    chunks = list(api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7, n=3,
                                         stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert list(texts.values()) == alone
    assert chunks[-1].usage.completion_tokens == several.usage.completion_tokens


@pytest.mark.serve
@pytest.mark.parametrize("name", list(MODELS))
def test_a_prompt_that_shares_a_prefix_with_an_earlier_one_reuses_its_blocks_and_gives_the_same_answer(server, name):
    """Prefix caching on every parallelType, static and continuous: the second prompt's shared blocks are taken from
    the cache (cached_tokens, as OpenAI reports it), and both answers equal single-process greedy generate."""
    ts, model_dir = server
    api = client(ts, name)
    shared = "A system prompt that every request of this application starts with, long enough for blocks. " * 3
    first = api.completions.create(model=name, prompt=shared + "First question?", max_tokens=8, temperature=0)
    second = api.completions.create(model=name, prompt=shared + "Another one?", max_tokens=8, temperature=0)
    assert first.choices[0].text == reference_text(model_dir, shared + "First question?", 8)
    assert second.choices[0].text == reference_text(model_dir, shared + "Another one?", 8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 48 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    chat = api.chat.completions.create(model=name, messages=[{"role": "user", "content": shared + "Last one?"}],
                                       max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(chat)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference_text(
        model_dir, f"user: {shared}Last one?\nassistant:", 6)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0  # the template put other tokens first


VERDICT = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                            "count": {"type": "integer", "minimum": 0, "maximum": 9}},
           "required": ["answer", "count"], "additionalProperties": False}


def masked_reference_text(model_dir, prompt: str, grammar, max_new_tokens: int) -> str:
    """Single-process greedy generate held to `grammar` (compact JSON, as the served models), as text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.structured_output import Grammars

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    grammars = Grammars(tokenizer, hf.config.vocab_size, [hf.generation_config.eos_token_id], compact_json=True)
    return tokenizer.decode(masked_greedy(hf, grammars, grammar, tokenizer(prompt)["input_ids"], max_new_tokens),
                            skip_special_tokens=True)


@pytest.mark.serve
@pytest.mark.parametrize("name", list(MODELS))
def test_structured_output_follows_the_schema_beside_free_requests(server, name):
    """response_format json_schema and json_object through the openai client, streamed and not, sent while a free
    request runs (on continuous batching it joins the running batch): valid JSON for the schema, the greedy answer
    equals single-process generate under the same mask, and the free request's answer is untouched; a schema the
    library rejects is a 400 that names response_format; TGI's grammar parameter takes a regex."""
    import threading

    import jsonschema
    from openai import BadRequestError

    from ts_plugin.structured_output import Grammar

    ts, model_dir = server
    api = client(ts, name)
    free = {}
    running = threading.Thread(target=lambda: free.update(text=api.completions.create(
        model=name, prompt=PROMPTS[1], max_tokens=32, temperature=0).choices[0].text))
    running.start()
    schema_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}}
    held = api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=32, temperature=0,
                                  extra_body={"response_format": schema_format})  # vLLM's extra on completions
    running.join()
    assert free["text"] == reference_text(model_dir, PROMPTS[1], 32)
    assert held.choices[0].finish_reason == "stop", held.choices[0].text
    jsonschema.validate(json.loads(held.choices[0].text), VERDICT)
    assert held.choices[0].text == masked_reference_text(model_dir, PROMPTS[0], Grammar.json_schema(VERDICT), 32)

    stream = api.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello world"}],
                                         max_tokens=32, temperature=0, stream=True,
                                         response_format={"type": "json_object"})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == masked_reference_text(model_dir, "user: hello world\nassistant:",
                                         Grammar.json_schema({"type": "object"}), 32)

    with pytest.raises(BadRequestError, match="response_format.json_schema.schema cannot be followed"):
        api.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    answer = ts.predict(name, {"inputs": PROMPTS[2], "parameters": {
        "max_new_tokens": 12, "grammar": {"type": "regex", "value": "[0-9]{3}-[0-9]{2}"}}})
    assert answer.status_code == 200, answer.text
    assert re.fullmatch(r"[0-9]{3}-[0-9]{2}", answer.json()["generated_text"])


@pytest.mark.serve
@pytest.mark.parametrize("name", list(MODELS))
def test_forced_tool_calls_through_the_openai_client(server, name):
    """tool_choice "required" and a named function: the answer's tool_calls name a given tool with arguments valid
    for its schema, streamed and not; the named function's arguments equal single-process generate under the
    same grammar; "auto" without handler.tool_call_parser is a 400 that names it."""
    import jsonschema
    from openai import BadRequestError

    from ts_plugin.structured_output import Grammar

    ts, model_dir = server
    api = client(ts, name)
    messages = [{"role": "user", "content": "weather?"}]
    required = api.chat.completions.create(model=name, messages=messages, max_tokens=32, temperature=0,
                                           tools=[WEATHER, CLOCK], tool_choice="required")
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    schemas = {"weather": WEATHER["function"]["parameters"], "clock": {"type": "object"}}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = {"type": "function", "function": {"name": "weather"}}
    forced = api.chat.completions.create(model=name, messages=messages, max_tokens=32, temperature=0,
                                         tools=[WEATHER, CLOCK], tool_choice=named)
    call = forced.choices[0].message.tool_calls[0]
    expected = masked_reference_text(model_dir, "user: weather?\nassistant:",
                                     Grammar.json_schema(WEATHER["function"]["parameters"]), 32)
    assert (call.function.name, json.loads(call.function.arguments)) == ("weather", json.loads(expected))
    chunks = list(api.chat.completions.create(model=name, messages=messages, max_tokens=32, temperature=0,
                                              tools=[WEATHER, CLOCK], tool_choice=named, stream=True))
    streamed = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed] == [("weather", json.loads(expected))]
    with pytest.raises(BadRequestError, match="handler.tool_call_parser"):
        api.chat.completions.create(model=name, messages=messages, max_tokens=4, tools=[WEATHER])


@pytest.mark.serve
@pytest.mark.parametrize("name", ["oa-custom", "oa-tp-cb", "oa-pptp-cb"])
def test_langchain_structured_output_and_tool_calls(server, name):
    """LangChain's ChatOpenAI, a second real client: with_structured_output (json_schema) gives a dict valid for
    the schema, and bind_tools with a named tool and with "any" (OpenAI's "required") gives valid tool calls."""
    import jsonschema

    langchain_openai = pytest.importorskip("langchain_openai", reason="pip install -e .[langchain]")
    ts, _ = server
    llm = langchain_openai.ChatOpenAI(base_url=f"{ts.inference_url}/predictions/{name}/1.0/v1", model=name,
                                      api_key=ts.key or "unused", temperature=0, max_tokens=32, max_retries=0)
    verdict = llm.with_structured_output({"title": "verdict", **VERDICT}, method="json_schema").invoke("Is it so?")
    jsonschema.validate(verdict, VERDICT)
    for choice in ("weather", "any"):
        message = llm.bind_tools([WEATHER, CLOCK], tool_choice=choice).invoke("weather?")
        assert message.tool_calls, message
        for call in message.tool_calls:
            assert call["name"] in ("weather", "clock")
            if call["name"] == "weather":
                jsonschema.validate(call["args"], WEATHER["function"]["parameters"])
