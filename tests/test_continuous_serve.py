"""continuousBatching: true through the real TorchServe, on every parallelType (custom and tp also with the step
compiled): requests join the running batch at every step, a short one overtakes a long one, cancelled clients free
their rows, seeds stay per request."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from _llm import (PARSE_CRASHES, PROMPTS, REPO, bad_body_beside_a_stream, ranks_rss, reference_text, serving,
                  stream_text, tiny_llama_and_store)
from ts_plugin.testing import archive_model, java_available, write_config

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

LONG = 100  # new tokens of the long request, on PROMPTS[2] (the tiny model ends the others sooner)
BUDGET = 32  # handler.max_num_batched_tokens: PROMPTS join whole, LONG_PROMPT is prefilled in chunks
LONG_PROMPT = "tokens flow through stages ; ranks agree on every step . " * 6
MODELS = {  # name -> (example, overrides)
    "cb-custom": ("custom", {}),
    "cb-tp": ("tp", {}),
    "cb-pp": ("pp", {}),  # the example's chunks 2: two groups of rows, one per stage
    "cb-pptp": ("pptp", {}),
    # the step compiled at load (handler.compile_step): the same exact answers
    "cb-custom-compiled": ("custom", {"startupTimeout": 600, "handler": {"compile_step": True}}),
    "cb-tp-compiled": ("tp", {"startupTimeout": 600, "handler": {"compile_step": True}}),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    model_dir, store = tiny_llama_and_store(root)
    for name, (example, overrides) in MODELS.items():
        config = write_config(root / f"{name}.yaml", REPO / f"examples/{example}/model-config.yaml",
                              continuousBatching=True, batchSize=4, maxBatchDelay=50, deviceType="cpu",
                              handler={"max_new_tokens": LONG, "max_length": 200,
                                       "max_num_batched_tokens": BUDGET, **overrides.get("handler", {})},
                              **{key: value for key, value in overrides.items() if key != "handler"})
        archive_model(store, name, config, model_dir)
    with serving(root / "ts", store, MODELS) as ts:
        yield ts, model_dir


def test_the_long_request_really_is_long(server):
    _, model_dir = server
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(model_dir))(reference_text(model_dir, PROMPTS[2], LONG))["input_ids"]
    assert len(tokens) > LONG // 2  # no early end of sequence: the overtaking test below needs the time


@pytest.mark.parametrize("name", list(MODELS))
def test_a_short_request_overtakes_a_long_one(server, name):
    ts, model_dir = server
    events = []
    long_body = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": LONG}, "stream": True}
    with ts.predict(name, long_body, stream=True) as long_response:
        assert long_response.status_code == 200, long_response.text
        chunks = long_response.iter_content(chunk_size=None)
        first = next(chunks)  # the long request is generating
        short = ts.predict(name, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 2}})
        events.append("short done")
        rest = list(chunks)
        events.append("long done")
    assert short.status_code == 200, short.text
    assert short.json()["generated_text"] == reference_text(model_dir, PROMPTS[0], 2)
    assert stream_text([first, *rest]) == reference_text(model_dir, PROMPTS[2], LONG)
    assert rest, "the long request was still streaming when the short one finished"
    assert events == ["short done", "long done"]


@pytest.mark.parametrize("name", list(MODELS))
def test_concurrent_mixed_requests_are_exact_and_seeds_stay_per_request(server, name):
    ts, model_dir = server
    seeded = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 12, "do_sample": True, "temperature": 1.3,
                                                  "seed": 99}}
    alone = ts.predict(name, seeded)
    assert alone.status_code == 200, alone.text
    bodies = [{"inputs": p, "parameters": {"max_new_tokens": n}} for p, n in zip(PROMPTS, (20, 5, 9))]
    bodies.insert(1, seeded)
    bodies.append({"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 6}, "stream": True})
    results = [None] * len(bodies)

    def send(index: int, delay: float) -> None:
        time.sleep(delay)
        body = bodies[index]
        if body.get("stream"):
            results[index] = stream_text(ts.stream_chunks(name, body))
        else:
            results[index] = ts.predict(name, body)

    threads = [threading.Thread(target=send, args=(i, 0.05 * i)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results[1].status_code == 200 and results[1].json() == alone.json()
    for index, (prompt, n) in zip((0, 2, 3), zip(PROMPTS, (20, 5, 9))):
        assert results[index].status_code == 200, results[index].text
        assert results[index].json()["generated_text"] == reference_text(model_dir, prompt, n)
    assert results[4] == reference_text(model_dir, PROMPTS[2], 6)


@pytest.mark.parametrize("name", ["cb-custom", "cb-tp"])
def test_a_bad_request_gets_4xx_beside_running_ones(server, name):
    ts, model_dir = server
    good = threading.Thread(target=lambda: results.append(
        ts.predict(name, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 30}})))
    results = []
    good.start()
    time.sleep(0.1)
    bad = ts.predict(name, {"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, timeout=30)
    good.join(timeout=120)
    assert bad.status_code == 400 and "max_new_tokens" in bad.text
    assert results[0].status_code == 200
    assert results[0].json()["generated_text"] == reference_text(model_dir, PROMPTS[0], 30)


@pytest.mark.parametrize("name", ["cb-custom", "cb-tp"])
def test_a_form_encoded_body_gets_400_that_says_to_send_json(server, name):
    """`curl -d '{...}'` without a Content-Type: TorchServe reads the body as form fields and the row comes empty,
    like a running request's; it must not be answered as a lost one (500)."""
    ts, model_dir = server
    body = json.dumps({"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 5}})
    form = ts.predict(name, body, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert form.status_code == 400 and "Content-Type: application/json" in form.text, form.text
    answer = ts.predict(name, body, headers={"Content-Type": "application/json"})
    assert answer.json()["generated_text"] == reference_text(model_dir, PROMPTS[0], 5)


@pytest.mark.parametrize("name", ["cb-custom", "cb-pp"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_whole_after_its_first_step_is_sent(server, name, stream):
    """A request that ends in the step that admits it (one new token) is answered in its first reply: the
    frontend drops the HTTP head of a stream that ends in its first reply, so it must go out unstreamed."""
    ts, model_dir = server
    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 1}, "stream": stream}
    response = ts.predict(name, body, timeout=30)
    assert response.status_code == 200, response.text
    text = stream_text([response.content]) if stream else response.json()["generated_text"]
    assert text == reference_text(model_dir, PROMPTS[1], 1)


@pytest.mark.parametrize("name,world_size", [("cb-custom", 1), ("cb-tp", 2), ("cb-pp", 2)])
def test_cancelled_clients_free_their_rows(server, name, world_size):
    ts, model_dir = server
    body = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": LONG}, "stream": True}
    url = f"{ts.inference_url}/predictions/{name}"

    def cancel_one() -> None:
        with requests.post(url, json=body, headers=ts._headers(), stream=True, timeout=60) as response:
            next(response.iter_content(chunk_size=None))  # generating; then the client goes away

    cancel_one()
    time.sleep(0.5)
    before = ranks_rss(ts, name, world_size)
    for _ in range(50):
        cancel_one()
    answer = ts.predict(name, {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 10}})
    assert answer.status_code == 200 and answer.json()["generated_text"] == reference_text(model_dir, PROMPTS[1], 10)
    grown = ranks_rss(ts, name, world_size) - before
    assert grown < 64 * 2**20, f"worker memory grew by {grown / 2**20:.1f} MiB over 50 cancelled requests"
    log = (ts.log_dir / "model_log.log").read_text(encoding="utf-8", errors="replace")
    cancelled = sum(1 for line in log.splitlines() if f"{name}_" in line and "its client went away" in line)
    assert cancelled >= 40, cancelled  # the handler saw the rows leave (rank 0 says so)


def test_non_streaming_answer_is_one_json_body(server):
    ts, model_dir = server
    response = ts.predict("cb-tp", {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 8}})
    assert response.status_code == 200
    assert json.loads(response.text)["generated_text"] == reference_text(model_dir, PROMPTS[1], 8)


@pytest.mark.parametrize("case", PARSE_CRASHES, ids=[case[0] for case in PARSE_CRASHES])
@pytest.mark.parametrize("name", ["cb-custom", "cb-tp"])
def test_a_body_that_crashed_the_parser_is_answered_400_and_running_streams_go_on(server, name, case):
    ts, model_dir = server
    pid = ts.worker_pid(name)
    stream_body = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": LONG}, "stream": True}
    bad, text = bad_body_beside_a_stream(ts, name, case, stream_body, join_running=True)
    assert bad is not None and bad.status_code == 400, (bad.status_code, bad.text[:300]) if bad else text
    assert text == reference_text(model_dir, PROMPTS[2], LONG)
    assert ts.worker_pid(name) == pid


@pytest.mark.parametrize("name", list(MODELS))
def test_a_long_prompt_prefilled_in_chunks_beside_a_running_stream_gives_both_exact_answers(server, name):
    from transformers import AutoTokenizer

    ts, model_dir = server
    assert len(AutoTokenizer.from_pretrained(str(model_dir))(LONG_PROMPT)["input_ids"]) > 2 * BUDGET
    running = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": LONG}, "stream": True}
    with ts.predict(name, running, stream=True) as response:
        assert response.status_code == 200, response.text
        chunks = response.iter_content(chunk_size=None)
        first = next(chunks)
        joined = ts.predict(name, {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 8}, "stream": True},
                            timeout=60)
        rest = list(chunks)
    assert joined.status_code == 200, joined.text
    assert stream_text([joined.content]) == reference_text(model_dir, LONG_PROMPT, 8)
    assert stream_text([first, *rest]) == reference_text(model_dir, PROMPTS[2], LONG)
