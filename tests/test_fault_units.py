"""Fault handling without a server: a rank bound to its torchrun agent, a sampling failure shared with the other
ranks, extreme sampling parameters, a lost peer told from an ordinary failure, and request bodies whose parsing
raised something other than RequestError (issue 29 item 1), each answered on its own row."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import List, Optional

import pytest

from _llm import PARSE_CRASHES, REPO
from ts_plugin.engines._paged import KVPool
from ts_plugin.engines.base import StepModel
from ts_plugin.kv_blocks import KVBlocks

def test_a_rank_whose_torchrun_is_gone_refuses_to_load_and_a_loaded_rank_dies_with_its_agent():
    child = (
        "import ctypes, os, sys\n"
        "from ts_plugin.distributed import Ranks, StaleRankError, bind_to_launcher\n"
        "os.environ.update(TORCHELASTIC_RUN_ID='m_1', TORCHELASTIC_RESTART_COUNT=sys.argv[1])\n"
        "try:\n    bind_to_launcher(Ranks(1, 2, 1))\nexcept StaleRankError as e:\n    print('stale:', e)\n"
        "value = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG\n"
        "print('pdeathsig', value.value)\n")

    def run(restart: int, parent_is_torchrun: bool) -> str:
        # the rank's parent: a process whose command line names torchrun (as TorchServe's launch does), or not
        launcher = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {child!r}, '{restart}']))"
        args = [sys.executable, "-c", launcher] + (["--as", "torchrun"] if parent_is_torchrun else [])
        result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert result.returncode == 0, result.stderr
        return result.stdout

    # a fresh rank, or one from torchrun's own restart under a live torchrun: loads, and dies with its agent
    for restart in (0, 1):
        out = run(restart, parent_is_torchrun=True)
        assert "stale" not in out and f"pdeathsig {int(signal.SIGKILL)}" in out, out
    # a rank from torchrun's restart whose agent was killed (adopted by another process): refuses to load
    out = run(1, parent_is_torchrun=False)
    assert "stale: rank 1 (torchrun restart #1) has lost the torchrun agent" in out, out


class _Tokenizer:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class _StepModel(StepModel):
    def __init__(self, samples_here: bool, shared: Optional[int] = None):
        self.samples_here = samples_here
        self.shared_in: List[List[int]] = []
        self.forced = shared
        self.pool = KVPool(16)

    def forward(self, input_ids, batch):
        import torch

        return torch.zeros(len(batch.rows), 16)

    def share_tokens(self, tokens):
        self.shared_in.append(tokens.tolist())
        return tokens.fill_(self.forced) if self.forced is not None else tokens


def test_a_sampling_failure_on_the_driver_reaches_the_other_ranks(monkeypatch):
    from ts_plugin import generation
    from ts_plugin.continuous import generate
    from ts_plugin.requests import SamplingParams

    def boom(logits, sequences):
        raise ValueError("sampling failed")

    monkeypatch.setattr(generation, "choose_tokens", boom)
    driver = _StepModel(samples_here=True)
    from ts_plugin.distributed import InStepError

    kv = KVBlocks(8)
    with pytest.raises(InStepError, match="sampling failed"):
        generate(driver, _Tokenizer(), [[1, 2], [3]], [SamplingParams(4)] * 2, 0, [], kv=kv)
    # the driver still took part in the token exchange, sending -1: the followers do not wait forever
    assert driver.shared_in == [[-1, -1]] and kv.used == 0
    follower = _StepModel(samples_here=False, shared=-1)
    with pytest.raises(InStepError, match="driver rank failed"):
        generate(follower, _Tokenizer(), [[1, 2], [3]], [SamplingParams(4)] * 2, 0, [], kv=kv)
    assert kv.used == 0


@pytest.mark.parametrize("params", [{"temperature": 1e-300}, {"temperature": 1e-40, "top_k": 5, "top_p": 0.5},
                                    {"do_sample": True, "repetition_penalty": 1e-300}])
def test_an_extreme_but_allowed_temperature_or_penalty_samples_the_limit(params):
    import torch

    from ts_plugin.generation import _Sequence, choose_tokens
    from ts_plugin.requests import SamplingParams

    torch.manual_seed(0)
    logits = torch.randn(3, 64) * 4
    rows = [_Sequence([1, 2], SamplingParams(8, **params), torch.Generator().manual_seed(row)) for row in range(3)]
    chosen = choose_tokens(logits, rows)  # multinomial raised "probability tensor contains inf/nan" before
    if "temperature" in params:
        assert chosen.tolist() == logits.argmax(-1).tolist()
    assert all(0 <= token < 64 for token in chosen.tolist())


def test_a_lost_peer_is_told_from_an_ordinary_failure():
    """How distributed.leave_worker says why a rank exits: another rank is gone, or it failed alone."""
    from ts_plugin.distributed import peer_lost

    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except OSError as cause:
            raise RuntimeError("a collective failed") from cause
    except RuntimeError as error:
        assert peer_lost(error)
    assert peer_lost(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:40119"))
    assert not peer_lost(RuntimeError("the driver rank failed while choosing the next tokens; see its log"))
    assert not peer_lost(ValueError("sampling failed"))



@pytest.fixture(scope="module")
def parsing_handler(tmp_path_factory):
    """A handler with what `preprocess` reads: the limits, a tokenizer with a chat template, the config."""
    from ts_plugin.config import validate_text
    from ts_plugin.handlers import LLMHandler
    from ts_plugin.requests import Limits
    from ts_plugin.testing import make_tokenizer

    handler = LLMHandler()
    handler.config = validate_text("handler:\n  chat_template: \"{% for m in messages %}{{ m.content }}{% endfor %}\"\n").config
    handler.limits = Limits(max_new_tokens=16, max_request_bytes=1_000_000)
    handler.tokenizer = make_tokenizer(tmp_path_factory.mktemp("tok"))
    handler.max_positions = 256
    return handler


CHAT_SURROGATE = ("chat-lone-surrogate", "v1/chat/completions",
                  b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', {})


@pytest.mark.parametrize("case", PARSE_CRASHES + [CHAT_SURROGATE], ids=[c[0] for c in PARSE_CRASHES + [CHAT_SURROGATE]])
@pytest.mark.parametrize("parsed_by_torchserve", [False, True], ids=["bytes", "parsed"])
def test_a_body_that_crashed_the_parser_becomes_its_rows_400(parsing_handler, case, parsed_by_torchserve):
    """Each row keeps its own verdict: the good rows beside the bad one are parsed as ever."""
    from ts_plugin.requests import RequestError, TextRequest

    _, route, body, _ = case
    if parsed_by_torchserve:  # what TorchServe hands over for application/json when its own json.loads succeeds
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            pass  # it forwards the bytes
    good = {"body": {"": b'{"inputs": "hello"}', "v1/completions": b'{"prompt": "hello", "max_tokens": 3}',
                     "v1/chat/completions": b'{"messages": [{"role": "user", "content": "hello"}]}'}[route]}
    parsed = parsing_handler.preprocess([good, {"body": body}, good], [route] * 3)
    assert isinstance(parsed[1], RequestError) and parsed[1].status == 400, parsed[1]
    assert all(isinstance(item, TextRequest) and item.input_ids for item in (parsed[0], parsed[2])), parsed


def test_an_unexpected_error_while_reading_a_row_stays_that_rows_400(parsing_handler, monkeypatch):
    from ts_plugin.requests import RequestError, TextRequest

    tokenize = parsing_handler.tokenizer.__class__.__call__

    def picky(self, text, *args, **kwargs):
        if "boom" in text:
            raise KeyError("a tokenizer bug")
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(parsing_handler.tokenizer.__class__, "__call__", picky)
    parsed = parsing_handler.preprocess([{"body": b"boom"}, {"body": b"fine"}])
    assert isinstance(parsed[0], RequestError) and parsed[0].status == 400 and "KeyError" in str(parsed[0])
    assert isinstance(parsed[1], TextRequest)


WATCH_SCRIPT = r"""
import os, sys, time
import torch.distributed as dist
from ts_plugin.distributed import Ranks, watch_peers
ranks = Ranks.from_env()
dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size)
watch_peers(ranks, timeout_s=3, interval_s=0.5)
print("watching", flush=True)
if sys.argv[1:] == ["shut-down"]:  # as a rank that is shutting down: its groups go, then it lingers
    time.sleep(1)
    dist.destroy_process_group()
    time.sleep(2)  # four rounds of the watch
    print("left cleanly", flush=True)
    sys.exit(0)
time.sleep(120)
"""


def test_the_ranks_watch_leaves_the_worker_when_a_peer_stops_answering(tmp_path):
    """distributed.watch_peers on two gloo ranks: quiet while both answer (several rounds), and the live rank
    leaves (exit 70) within an interval and the timeout once its peer is SIGSTOPped."""
    import time

    from ts_plugin.testing import free_ports

    script = tmp_path / "watch.py"
    script.write_text(WATCH_SCRIPT)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0]), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": ""}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "watching", proc.stderr.read()
        time.sleep(3)  # six rounds of the watch
        assert [proc.poll() for proc in procs] == [None, None]
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert procs[0].wait(timeout=30) == 70, procs[0].stderr.read()
        assert time.monotonic() - stopped < 3 + 0.5 + 5
        assert "did not answer within 3 s" in procs[0].stderr.read()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_the_ranks_watch_stays_quiet_while_a_rank_shuts_down(tmp_path):
    """A rank that destroys its process groups (shutting down) ends its watch quietly and exits 0, rather than
    reading its own gone groups as a lost peer (exit 70)."""
    from ts_plugin.testing import free_ports

    script = tmp_path / "watch.py"
    script.write_text(WATCH_SCRIPT)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0]), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": ""}
    procs = [subprocess.Popen([sys.executable, str(script), "shut-down"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0 and "left cleanly" in out, err[-3000:]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
