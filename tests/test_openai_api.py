"""OpenAI's routes: the parser and the bodies in-process, then the real `openai` client against the real TorchServe
(completions and chat, streamed and not), static and continuous batching, every parallelType."""
from __future__ import annotations

import json

import pytest

from _llm import PROMPTS, REPO, reference_text, serving, tiny_llama_and_store
from ts_plugin.generation import SequenceResult
from ts_plugin.handlers._openai import CHAT, COMPLETIONS, OpenAIFormat, parse_openai
from ts_plugin.requests import Limits, RequestError
from ts_plugin.testing import archive_model, java_available, write_config

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
LIMITS = Limits(max_new_tokens=32, max_request_bytes=10_000)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from ts_plugin.testing import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def row(body) -> dict:
    return {"body": json.dumps(body).encode()}


def test_completions_body_becomes_a_request(tokenizer):
    request = parse_openai(row({"model": "m", "prompt": ["hello"], "max_tokens": 5, "temperature": 0, "stop": "x",
                                "seed": 3, "stream": True, "stream_options": {"include_usage": True}}),
                           COMPLETIONS, LIMITS, tokenizer, None)
    assert (request.prompt, request.params.max_new_tokens, request.params.stop, request.params.seed) == \
        ("hello", 5, ["x"], 3)
    assert not request.params.do_sample and request.stream and request.include_usage and request.api == COMPLETIONS
    sampled = parse_openai(row({"prompt": "hi", "temperature": 0.7, "top_p": 0.9}), COMPLETIONS, LIMITS, tokenizer,
                           None)
    assert sampled.params.do_sample and sampled.params.temperature == 0.7 and sampled.params.top_p == 0.9
    assert sampled.params.max_new_tokens == LIMITS.max_new_tokens


def test_chat_goes_through_the_chat_template(tokenizer):
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]}
    request = parse_openai(row(body), CHAT, LIMITS, tokenizer, TEMPLATE)
    assert request.prompt == "system: be brief\nuser: hello\nassistant:"
    with pytest.raises(RequestError, match="no chat template .* handler.chat_template"):
        parse_openai(row(body), CHAT, LIMITS, tokenizer, None)


@pytest.mark.parametrize("route, body, status, words", [
    (COMPLETIONS, {"prompt": "hi", "n": 2}, 400, "one choice"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 33}, 400, "at most 32"),
    (COMPLETIONS, {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "bogus": 1}, 400, "bogus"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "content"),
    ("v1/embeddings", {"input": "hi"}, 404, "v1/completions"),
])
def test_bad_bodies_are_refused_with_the_reason(tokenizer, route, body, status, words):
    with pytest.raises(RequestError, match=words) as error:
        parse_openai(row(body), route, LIMITS, tokenizer, TEMPLATE)
    assert error.value.status == status


def test_stream_events_end_with_the_finish_usage_and_done(tokenizer):
    request = parse_openai(row({"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                "stream_options": {"include_usage": True}}), CHAT, LIMITS, tokenizer, TEMPLATE)
    answer = OpenAIFormat(request, "r1", "m")
    first = answer.event("Hel")
    result = SequenceResult("Hello", [5, 6], 4, "eos_token", 0.1, 0.2)
    last = answer.event("lo", result)
    events = [line[len("data: "):] for line in (first + last).split("\n\n") if line]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert chunks[1]["choices"][0] == {"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}
    assert chunks[2]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
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
    with pytest.raises(BadRequestError, match="one choice"):
        api.completions.create(model=name, prompt="hi", max_tokens=4, n=2)
    with pytest.raises(BadRequestError, match="at most 32"):
        api.completions.create(model=name, prompt="hi", max_tokens=500)
    assert api.completions.create(model=name, prompt=PROMPTS[1], max_tokens=6, temperature=0).choices[0].text == \
        reference_text(model_dir, PROMPTS[1], 6)
    models = ts.predict(f"{name}/1.0/v1/models", b"")
    assert models.status_code == 200 and models.json()["data"][0]["id"]
