"""ts_plugin.step_loop on a real tiny Llama: requests handed to the loop while it steps get single-process greedy
tokens and their whole text across calls; a call waits for one step at most; a failed step is raised by the next
call and the loop serves on. Under real torchrun (2 ranks, gloo), ranks whose calls arrive at different moments, one
of them without a request's body, step the same batch: the same joins and cancellations at the same steps, and the
same answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from _llm import PROMPTS
from ts_plugin.continuous import ContinuousBatch
from ts_plugin.engines.base import HFStepModel
from ts_plugin.kv_blocks import KVBlocks
from ts_plugin.requests import SamplingParams
from ts_plugin.step_loop import StepLoop
from ts_plugin.testing import free_ports

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("loop") / "llama")
    return path, AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def reference(hf, ids, max_new_tokens):
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    return out[0, len(ids):].tolist()


def new_loop(hf, tokenizer, step_model=None):
    step_model = step_model or HFStepModel(hf, torch.device("cpu"))
    return StepLoop(ContinuousBatch(step_model, tokenizer, [], 0, KVBlocks(256)))  # no eos: every answer runs to max_new_tokens


def collect(loop, outputs, texts, results, pause_s=0.0):
    for row_id, output in outputs.items():
        texts[row_id] = texts.get(row_id, "") + output.text
        if output.result is not None:
            results[row_id] = output.result
    time.sleep(pause_s)


def test_requests_handed_over_while_it_steps_get_greedy_tokens_and_their_whole_text(tiny):
    _, hf, tokenizer = tiny
    loop = new_loop(hf, tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    texts, results = {}, {}
    try:
        collect(loop, loop.exchange([("a", prompts[0], SamplingParams(12))], []), texts, results)
        # slow calls: several steps run between two of them, and their outputs are merged, not lost
        collect(loop, loop.exchange([("b", prompts[1], SamplingParams(5))], []), texts, results, pause_s=0.05)
        collect(loop, loop.exchange([("c", prompts[2], SamplingParams(7))], []), texts, results, pause_s=0.05)
        while len(results) < 3:
            collect(loop, loop.exchange([], []), texts, results)
        assert loop.exchange([], []) == {}  # idle: a call returns at once
    finally:
        loop.close()
    for row_id, prompt, count in (("a", prompts[0], 12), ("b", prompts[1], 5), ("c", prompts[2], 7)):
        assert results[row_id].token_ids == reference(hf, prompt, count)
        assert texts[row_id] == results[row_id].text


def test_a_call_waits_for_one_step_and_a_cancelled_row_leaves(tiny):
    _, hf, tokenizer = tiny
    steps = []
    step_model = HFStepModel(hf, torch.device("cpu"))
    forward = step_model.forward
    step_model.forward = lambda *args: (steps.append(args[0].shape), forward(*args))[1]
    loop = new_loop(hf, tokenizer, step_model)
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    try:
        first = loop.exchange([("kept", prompt, SamplingParams(40)), ("gone", prompt, SamplingParams(40))], [])
        assert set(first) == {"kept", "gone"}  # the call waited for the step that prefilled them
        calls = [loop.exchange([], []) for _ in range(3)]
        assert all(set(outputs) == {"kept", "gone"} for outputs in calls)
        loop.exchange([], ["gone"])
        later = loop.exchange([], [])
        assert set(later) == {"kept"} and len(loop.live) == 1
        assert len(steps) < 40  # calls did not run ahead of the answers: each waited for one step
    finally:
        loop.close()


def test_a_failed_step_is_raised_by_the_next_call_and_the_loop_serves_on(tiny):
    _, hf, tokenizer = tiny
    step_model = HFStepModel(hf, torch.device("cpu"))
    forward, failures = step_model.forward, [RuntimeError("the forward broke")]

    def breaking_forward(ids, batch):
        if failures and all(row.new == 1 for row in batch.rows):  # the first decode step
            raise failures.pop()
        return forward(ids, batch)

    step_model.forward = breaking_forward
    loop = new_loop(hf, tokenizer, step_model)
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    try:
        with pytest.raises(RuntimeError, match="the forward broke"):
            loop.exchange([("doomed", prompt, SamplingParams(6))], [])
            for _ in range(3):
                loop.exchange([], [])
        assert len(loop.live) == 0  # the batch reset itself
        texts, results = {}, {}
        collect(loop, loop.exchange([("next", prompt, SamplingParams(6))], []), texts, results)
        while "next" not in results:
            collect(loop, loop.exchange([], []), texts, results)
    finally:
        loop.close()
    assert results["next"].token_ids == reference(hf, prompt, 6)


RANKS_SCRIPT = textwrap.dedent(r'''
    import json, random, sys, time
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.continuous import ContinuousBatch
    from ts_plugin.engines.base import HFStepModel
    from ts_plugin.kv_blocks import KVBlocks
    from ts_plugin.requests import SamplingParams
    from ts_plugin.step_loop import StepLoop, decision_group

    model_dir, out_dir, calls = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    live = ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [], 0, KVBlocks(256))
    decisions = []  # what each step started with: (joining ids, cancelled ids)
    steps, cancel = live.steps, live.cancel
    live.cancel = lambda ids: (decisions.append(("cancel", sorted(ids))), cancel(ids))[1]
    live.steps = lambda joining, count: (decisions.append(("join", [j[0] for j in joining])), steps(joining, count))[1]
    loop = StepLoop(live, group=decision_group())
    jitter = random.Random(rank)
    texts, results = {}, {}

    def take(outputs):
        for row_id, output in outputs.items():
            texts[row_id] = texts.get(row_id, "") + output.text
            if output.result is not None:
                results[row_id] = output.result.token_ids

    for index, (joining, cancelled) in enumerate(calls):  # the frontend's calls, reaching this rank a little
        # earlier or later; rank 1 falls behind before call 2, so rank 0 starts call 4's requests first
        time.sleep(jitter.uniform(0, 0.06) + (0.3 if rank == 1 and index == 2 else 0))
        if rank == 1:  # TorchServe may send rank 1 a new request without its body
            joining = [request for request in joining if request[0] != "d"]
        take(loop.exchange([(row_id, tokenizer(prompt)["input_ids"], SamplingParams(count))
                            for row_id, prompt, count in joining], cancelled))
    cancelled_ids = {row_id for _, cancelled in calls for row_id in cancelled}
    wanted = {row_id for joining, _ in calls for row_id, _, _ in joining} - cancelled_ids
    while not wanted <= set(results):
        take(loop.exchange([], []))
        time.sleep(0.01)  # rank 1's calls do not wait for a step
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"decisions": decisions, "results": results,
                                                          "texts": texts}))
    loop.close()  # rank 0's close stops rank 1's loop too
    assert not loop._thread.is_alive()
    dist.barrier()
''')


def test_ranks_with_calls_at_different_moments_step_the_same_batch(tiny, tmp_path):
    model_dir, hf, tokenizer = tiny
    calls = [([("a", PROMPTS[0], 200)], []), ([("b", PROMPTS[1], 6)], []), ([], []), ([], []),
             ([("c", PROMPTS[2], 30), ("d", PROMPTS[0], 30)], []), ([], ["c"]),  # c: cancelled while queued or new
             ([("e", PROMPTS[1], 9)], ["a"]), ([], []), ([("f", PROMPTS[2], 150)], []), ([], ["f"]), ([], [])]
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    run = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                          str(free_ports(1)[0]), str(script), str(model_dir), str(tmp_path), json.dumps(calls)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert ranks[0]["results"] == ranks[1]["results"] and ranks[0]["texts"] == ranks[1]["texts"]
    assert {"a", "c", "f"}.isdisjoint(ranks[0]["results"])
    for row_id, prompt, count in (("b", PROMPTS[1], 6), ("d", PROMPTS[0], 30), ("e", PROMPTS[1], 9)):
        assert ranks[0]["results"][row_id] == reference(hf, tokenizer(prompt)["input_ids"], count)


RELEASE_SCRIPT = textwrap.dedent(r'''
    import os, threading, torch
    from ts_plugin.step_loop import release_openmp_workers
    torch.set_num_threads(2)
    def threads():
        return len(os.listdir("/proc/self/task"))
    weight, rows = torch.randn(1536, 576), torch.randn(8, 576)
    torch.nn.functional.linear(rows, weight)  # a parallel region: this thread's OpenMP team starts
    with_team = threads()
    release_openmp_workers()
    released = threads()
    result = []
    worker = threading.Thread(target=lambda: result.append(torch.nn.functional.linear(rows, weight)))
    worker.start()
    worker.join()
    print(with_team, released, torch.allclose(result[0], rows @ weight.t(), atol=1e-4))
''')


def test_the_loading_threads_openmp_workers_end_before_the_loop_steps():
    # two OpenMP teams on 2 CPUs made every parallel region of the loop's thread wait for its workers to wake
    out = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    with_team, released, correct = out.stdout.split()
    assert int(released) == int(with_team) - 1 and correct == "True"
