"""ts_plugin.continuous.ContinuousGroups in-process, on a real tiny Llama: where the engine splits a batch into row
groups (pp with pippy.chunks), the live rows form that many ContinuousBatches, each stepped by a thread of its own;
answers equal single-process generate, requests spread over the groups, seeds follow the join order as in one
batch, a group never waits for another's step, and a failure in one group fails them all."""
from __future__ import annotations

import threading
from typing import List

import pytest
import torch

from _llm import PROMPTS
from test_continuous_batch import reference
from ts_plugin.continuous import ContinuousBatch, ContinuousGroups, continuous_batch
from ts_plugin.engines.base import HFStepModel
from ts_plugin.kv_blocks import KVBlocks
from ts_plugin.requests import SamplingParams


class TwoGroups(HFStepModel):
    """A step model that, like pp with chunks 2 over 2 stages, generates a batch in two groups of rows (whose steps
    take turns on the model, as on pp's stage 0)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._turn = threading.Lock()

    def forward(self, input_ids, batch):
        with self._turn:
            return super().forward(input_ids, batch)

    def row_groups(self, rows: int) -> List[range]:
        half = (rows + 1) // 2
        return [range(0, half), range(half, rows)] if rows > 1 else [range(rows)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("groups") / "llama", arch="llama")
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def run(live, schedule, calls):
    """schedule: call -> [(request id, prompt ids, params)] handed over then; returns request id -> result."""
    results = {}
    for call in range(calls):
        for request_id, output in live.steps(schedule.get(call, []), 1).items():
            if output.result is not None:
                results[request_id] = output.result
    while len(live):
        results.update((request_id, output.result) for request_id, output in live.steps([], 1).items()
                       if output.result is not None)
    return results


def test_the_model_row_groups_pick_groups_or_one_batch(model):
    hf, tokenizer = model
    cpu = torch.device("cpu")
    assert isinstance(continuous_batch(TwoGroups(hf, cpu), tokenizer, [2], 0, 4, KVBlocks(64)), ContinuousGroups)
    assert isinstance(continuous_batch(HFStepModel(hf, cpu), tokenizer, [2], 0, 4, KVBlocks(64)), ContinuousBatch)


def test_rows_in_groups_give_single_process_greedy_tokens(model):
    hf, tokenizer = model
    live = ContinuousGroups(TwoGroups(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0, 2,
                            KVBlocks(256))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    live.steps([("long", prompts[0], SamplingParams(14))], 1)
    live.steps([("short", prompts[1], SamplingParams(12)), ("mid", prompts[2], SamplingParams(6))], 1)

    def group_of(request_id):
        return next(index for index, (batch, handed) in enumerate(zip(live.batches, live._handed))
                    if request_id in batch or any(request[0] == request_id for request in handed))

    # "short" went to the empty group, "mid" to the one with "long" (fewest rows first, ties to the first)
    assert (group_of("long"), group_of("short"), group_of("mid")) == (0, 1, 0)
    results = run(live, {2: [("late", prompts[1], SamplingParams(4))]}, 6)
    for request_id, prompt, length in (("short", 1, 12), ("mid", 2, 6), ("late", 1, 4), ("long", 0, 14)):
        assert results[request_id].token_ids == reference(hf, prompts[prompt], length), request_id
    assert len(live) == 0 and live.kv.used == 0
    live.close()
    assert not any(thread.is_alive() for thread in live._threads)


def test_sampled_requests_get_the_tokens_they_get_in_one_batch(model):
    """Unseeded requests take default_seed + the order they joined in, seeded ones their own seed: the same
    tokens whether the rows sit in groups or in one batch."""
    hf, tokenizer = model
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    schedule = {0: [("a", prompts[0], SamplingParams(8, do_sample=True, temperature=1.3))],
                1: [("b", prompts[1], SamplingParams(6, do_sample=True, top_k=20)),
                    ("seeded", prompts[2], SamplingParams(7, do_sample=True, seed=99))],
                3: [("c", prompts[2], SamplingParams(5, do_sample=True, top_p=0.9))]}
    grouped = run(ContinuousGroups(TwoGroups(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 7, 2,
                                      KVBlocks(256)),
                     schedule, 14)
    single = run(ContinuousBatch(HFStepModel(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 7,
                                    KVBlocks(256)),
                    schedule, 14)
    assert {k: v.token_ids for k, v in grouped.items()} == {k: v.token_ids for k, v in single.items()}
    assert len(grouped) == 4


def test_a_failure_in_one_group_resets_every_group(model):
    hf, tokenizer = model

    class FailsOnLongPrompts(TwoGroups):
        def forward(self, input_ids, batch):
            if input_ids.numel() > 12:
                raise RuntimeError("this stage failed")
            return super().forward(input_ids, batch)

    live = ContinuousGroups(FailsOnLongPrompts(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0, 2,
                            KVBlocks(256))
    short = tokenizer("hello world")["input_ids"]
    live.steps([("running", short, SamplingParams(20))], 1)
    with pytest.raises(RuntimeError, match="this stage failed"):
        live.steps([("other", short, SamplingParams(20)), ("bad", short * 8, SamplingParams(20))], 1)
        for _ in range(40):  # "bad" fails its group's first step; the other group may step first
            live.steps([], 1)
    assert len(live) == 0 and live.kv.used == 0
    # the groups step again afterwards
    assert run(live, {0: [("after", short, SamplingParams(3))]}, 1)["after"].token_ids == reference(hf, short, 3)


def test_a_group_steps_on_while_another_group_is_in_a_step(model):
    """No barrier between the groups: while group 1's step is held, group 0 runs its request to the end, and the
    held one then ends too (on pp, one group's step in stage 1 never keeps stage 0 from the other's next step)."""
    hf, tokenizer = model
    release = threading.Event()

    class HoldsGroupOne(TwoGroups):
        def forward(self, input_ids, batch):
            if threading.current_thread().name.endswith("-1"):
                release.wait(60)
            return super().forward(input_ids, batch)

    live = ContinuousGroups(HoldsGroupOne(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0, 2,
                            KVBlocks(256))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    live.steps([("free", prompts[0], SamplingParams(6)), ("held", prompts[1], SamplingParams(5))], 1)
    free = None
    for _ in range(20):
        outputs = live.steps([], 1)
        assert "held" not in outputs or outputs["held"].result is None
        if "free" in outputs and outputs["free"].result is not None:
            free = outputs["free"].result
            break
    assert free is not None and not release.is_set()
    release.set()
    results = run(live, {}, 0)
    assert free.token_ids == reference(hf, prompts[0], 6)
    assert results["held"].token_ids == reference(hf, prompts[1], 5)
    live.close()


def test_a_group_waiting_for_blocks_another_group_holds_does_not_spin(model):
    """A request whose group finds no free KV block (the other group's row holds them all) waits for the other
    group's steps instead of stepping its empty batch over and over, then starts once the blocks are freed."""
    hf, tokenizer = model
    live = ContinuousGroups(TwoGroups(hf, torch.device("cpu")), tokenizer, [tokenizer.eos_token_id], 0, 2,
                            KVBlocks(4))  # 64 slots
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    holder = (prompts[0] * 10)[:50]  # 50 + 12 new tokens: all 4 blocks
    live.steps([("holder", holder, SamplingParams(12))], 1)
    live.steps([("waiter", prompts[1], SamplingParams(5))], 1)
    results = run(live, {}, 0)
    assert results["holder"].token_ids == reference(hf, holder, 12)
    assert results["waiter"].token_ids == reference(hf, prompts[1], 5)
    # about one step of the waiting group per step of the holder's (a spinning group made thousands)
    assert live._stepped <= 4 * (12 + 5), live._stepped
    live.close()
