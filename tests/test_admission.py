"""What a client sees when TorchServe's job queue is full (issue 29 item 5), through the real TorchServe: a model
with jobQueueSize 2 and batchSize 1 whose steps take 0.25 s, and 10 requests at once. The frontend refuses the
requests its queue cannot hold with 503 before the handler sees them (its text says the model has no worker and
suggests scaling workers; there is no Retry-After), and every request it accepted gets its exact answer."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from _llm import PROMPTS, REPO, reference_text, serving_examples
from ts_plugin.testing import java_available

pytestmark = [pytest.mark.serve, pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")]

HANDLER = str(REPO / "tests/data/faults/slow_steps_handler.py")


def test_a_full_job_queue_refuses_with_503_and_every_accepted_request_is_exact(tmp_path):
    with serving_examples(tmp_path, {"queue": "custom"}, HANDLER, batchSize=1, jobQueueSize=2,
                          deviceType="cpu", handler={"max_new_tokens": 8}) as (ts, model_dir):
        body = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 8}}
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: ts.predict("queue", body, timeout=120), range(10)))
    expected = reference_text(model_dir, PROMPTS[2], 8)
    accepted = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert accepted and refused, [a.status_code for a in answers]
    assert all(a.json()["generated_text"] == expected for a in accepted)
    assert {a.status_code for a in refused} == {503}
    print(f"\n[admission] {len(accepted)} answered, {len(refused)} refused: {refused[0].text.strip()!r}; "
          f"Retry-After: {refused[0].headers.get('Retry-After')}")
