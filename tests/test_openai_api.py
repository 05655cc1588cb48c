"""OpenAI's routes: the parser and the bodies in-process, then the real `openai` client against the real TorchServe
(completions and chat, streamed and not), static and continuous batching, every parallelType."""
from __future__ import annotations

import json

import pytest

from _llm import PROMPTS, REPO, reference_text, serving, tiny_llama_and_store
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
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"1": 101}}, 400, "-100 to 100"),
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

MODELS = {  # name -> (example, handler, continuous batching)
    "oa-custom": ("custom", "accelerate_handler.py", False),
    "oa-custom-cb": ("custom", "accelerate_handler.py", True),
    "oa-tp-cb": ("tp", "deepspeed_handler.py", True),
    "oa-pp-cb": ("pp", "pipeline_handler.py", True),
    "oa-pptp-cb": ("pptp", "pptp_handler.py", True),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not java_available():
        pytest.skip("TorchServe needs Java 11+")
    root = tmp_path_factory.mktemp("oa")
    model_dir, store = tiny_llama_and_store(root)
    for name, (example, handler, continuous) in MODELS.items():
        extra = {"continuousBatching": True, "maxBatchDelay": 50} if continuous else {}
        config = write_config(root / f"{name}.yaml", REPO / f"examples/{example}/model-config.yaml",
                              batchSize=4, deviceType="cpu", handler={"max_new_tokens": 32, "chat_template": TEMPLATE},
                              **extra)
        archive_model(store, name, handler, config, model_dir)
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
