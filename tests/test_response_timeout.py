"""A static batch that outlasts responseTimeout (issue 29 item 4), through the real TorchServe: its WorkerThread
waits responseTimeout for each message of the worker, so the handler sends an empty intermediate response every
quarter of it in which a step of the batch ended (a streaming request's own chunks already did). Before, the frontend killed the worker at responseTimeout and every request in
flight failed."""
from __future__ import annotations

import json
import time

import pytest

from _llm import PROMPTS, REPO, reference_text, serving_examples
from ts_plugin.testing import java_available

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

HANDLER = REPO / "tests/data/faults/slow_steps_handler.py"
TIMEOUT_S = 5
LONG = 40  # new tokens at 0.25 s a step or more: twice responseTimeout
MODELS = {"slow-custom": "custom", "slow-tp": "tp"}  # name -> example


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_examples(tmp_path_factory.mktemp("response-timeout"), MODELS, str(HANDLER), batchSize=2, maxBatchDelay=1000,
                          responseTimeout=TIMEOUT_S, deviceType="cpu", continuousBatching=False,
                          handler={"max_new_tokens": LONG}) as served:
        yield served


@pytest.mark.parametrize("name", list(MODELS))
def test_a_batch_longer_than_response_timeout_is_answered_and_the_worker_stays(server, name):
    from concurrent.futures import ThreadPoolExecutor

    ts, model_dir = server
    pid = ts.worker_pid(name)
    bodies = [{"inputs": PROMPTS[2], "parameters": {"max_new_tokens": LONG}},
              {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}]
    started = time.monotonic()
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: ts.predict(name, body, timeout=60), bodies))
    assert time.monotonic() - started > TIMEOUT_S  # the batch really outlasted responseTimeout
    for answer in answers:
        assert answer.status_code == 200, answer.text
    assert json.loads(answers[0].content)["generated_text"] == reference_text(model_dir, PROMPTS[2], LONG)
    assert json.loads(answers[1].content)["generated_text"] == reference_text(model_dir, PROMPTS[0], 4)
    assert ts.worker_pid(name) == pid
