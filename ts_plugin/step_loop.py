"""The engine's own loop: under continuous batching the batch steps in a thread of its own on every rank that
generates, so a call from TorchServe hands over new requests and cancellations and collects what is ready instead of
running the step itself. The frontend's round trip and the handler's parsing and answers overlap the next forward.

Ranks that each get TorchServe's calls (tp, pptp) must step the same batch, yet their calls arrive at different
moments relative to their steps, and TorchServe 0.12 may even send a request to rank 1 without its body: it marks
a job as cached in the backend once rank 0 has answered, and the message to rank 1 can be encoded after that. So
rank 0's loop alone decides, from its own calls, what joins (with the prompt and parameters) and what is cancelled
before each step, and broadcasts that on a gloo group of their own; the other ranks' loops step on rank 0's word
only. While idle, rank 0 broadcasts an empty decision every IDLE_BEAT_S, so a rank waiting for the next decision
never reaches the group's timeout.
"""
from __future__ import annotations

import datetime
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .continuous import ContinuousBatch, ContinuousGroups, StepOutput, merge_outputs
from .requests import SamplingParams

Joining = Tuple[str, List[int], SamplingParams]
#: an idle rank 0 tells the others it is alive this often; the decisions' group waits GROUP_TIMEOUT_S at most
IDLE_BEAT_S, GROUP_TIMEOUT_S = 60.0, 600.0


def decision_group() -> Any:
    """The gloo group on which rank 0's loop tells the others each step; every rank of the world creates it."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))


def release_openmp_workers() -> None:
    """End the OpenMP worker threads of the calling thread (the one that loaded the model), before the loop's thread
    runs the steps: OpenMP keeps a team per thread that opened a parallel region, and with two teams on a host of few
    CPUs libgomp stops spinning between regions (more threads than CPUs), so every parallel region of the loop's
    thread waited for its workers to wake. On 2 CPUs, a decode step of SmolLM2 took 88 ms from a second thread
    against 68 ms from the loading thread, and 68 ms from it too once this ran (docs/benchmarks.md, "One OpenMP
    team"). OpenMP 5's `omp_pause_resource_all` (soft) ends them; a later region of the calling thread would start a
    new team. Where torch's OpenMP runtime lacks it, nothing changes."""
    import ctypes

    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
        runtime = next((line.split()[-1] for line in maps
                        if Path(line.split()[-1]).name.startswith(("libgomp", "libiomp"))), None)
        if runtime is not None:
            ctypes.CDLL(runtime).omp_pause_resource_all(1)  # omp_pause_soft
    except (OSError, AttributeError):  # no /proc (not Linux), or a runtime before OpenMP 5
        pass


@dataclass(frozen=True)
class LoopState:
    """The batch after the last step, for metrics: rows running and waiting (as vLLM counts them), KV positions
    held and their bound (None: no bound), preemptions so far."""

    running: int = 0
    waiting: int = 0
    kv_used: int = 0
    kv_bound: Optional[int] = None
    preemptions: int = 0


class StepLoop:
    """Steps `live` in a thread of its own while it has rows or requests to start.

    `exchange` is the one call: it hands over new requests and the row ids to cancel, and returns every output the
    steps produced since the previous exchange, merged per row; on the deciding rank, when there is none yet but a
    step is due, it waits for that one step. The other ranks take neither (rank 0's decisions bring them) and never
    wait: TorchServe reads rank 0's answers only. A step that raised is raised by the next exchange (the batch has
    then reset itself). `group`: the decision_group of ranks that step the same batch (None: this rank alone); its
    rank 0 decides. `steps` decode steps run between joins (handler.steps_per_call).

    Example::

        loop = StepLoop(continuous_batch(model, tokenizer, [2], 42, batch_size=8))
        outputs = loop.exchange([("req-1", prompt_ids, SamplingParams(max_new_tokens=16))], [])
        while not outputs.get("req-1", StepOutput("", None)).result:
            outputs = loop.exchange([], [])
        loop.close()
    """

    def __init__(self, live: Union[ContinuousBatch, ContinuousGroups], steps: int = 1, group: Any = None):
        import torch.distributed as dist

        self.live = live
        self._steps = steps
        self._group = group
        self.decides = group is None or dist.get_rank(group) == 0  # chooses joins and cancellations
        self._changed = threading.Condition()
        self._queue: Dict[str, Joining] = {}  # handed over, not started yet, in arrival order
        self._cancels: List[str] = []  # to apply before the next step
        self._ready: Dict[str, StepOutput] = {}
        self._stepped = 0
        self._has_rows = False
        self._error: Optional[BaseException] = None
        self._closed = False
        self.state = LoopState(kv_bound=live.kv_usage()[1])
        release_openmp_workers()
        self._thread = threading.Thread(target=self._run, name="ts_plugin-step-loop", daemon=True)
        self._thread.start()

    def exchange(self, joining: Sequence[Joining], cancelled: Sequence[str]) -> Dict[str, StepOutput]:
        """Hand over `joining` (row id, prompt ids, parameters) and the row ids to cancel; return the outputs
        ready since the last exchange, by row id."""
        with self._changed:
            self._raise_failure()
            if self.decides:
                self._queue.update((request[0], request) for request in joining)
                for row_id in cancelled:
                    if self._queue.pop(row_id, None) is None:
                        self._cancels.append(row_id)
                self._changed.notify_all()
                seen = self._stepped
                while (not self._ready and (self._queue or self._has_rows) and self._stepped == seen
                       and self._error is None and not self._closed):
                    self._changed.wait()
                self._raise_failure()
            ready, self._ready = self._ready, {}
            return ready

    def wait(self) -> Optional[BaseException]:
        """Return once the loop has ended: closed here, or (on the other ranks) by rank 0, or a peer is gone; with
        the error that ended it, if any."""
        self._thread.join()
        return self._error

    def close(self, wait_s: float = 10.0) -> None:
        """Stop after the step in flight (the other ranks' loops stop when rank 0's does) and release the batch."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(wait_s)
        if not self._thread.is_alive():
            self.live.close()

    def _raise_failure(self) -> None:
        if self._error is None:
            return
        error, self._error = self._error, None
        self._ready.clear()  # its requests fail with this call, and so do those handed over
        self._queue.clear()
        raise error

    def _run(self) -> None:
        while True:
            try:
                decision = self._decide() if self.decides else self._follow()
            except BaseException as error:  # noqa: BLE001 - a peer is gone: the next exchange raises it, none waits
                with self._changed:
                    self._error, self._closed = error, True
                    self._changed.notify_all()
                return
            if decision is None:
                return
            joining, cancelled = decision
            if not joining and not cancelled and not len(self.live):
                continue  # an idle beat
            try:
                if cancelled:
                    self.live.cancel(cancelled)
                outputs = self.live.steps(joining, self._steps) if joining or len(self.live) else {}
            except BaseException as error:  # noqa: BLE001 - the next exchange raises it
                outputs, failure = {}, error
            else:
                failure = None
            running, waiting = self.live.load()
            used, bound = self.live.kv_usage()
            with self._changed:
                merge_outputs(self._ready, outputs)
                self._error = failure or self._error
                self._stepped += 1
                self._has_rows = len(self.live) > 0
                self.state = LoopState(running, waiting, used, bound, self.live.preemptions)
                self._changed.notify_all()

    def _decide(self) -> Optional[Tuple[List[Joining], List[str]]]:
        """Rank 0 (or a lone rank): what joins and what is cancelled before the next step, told to the others."""
        with self._changed:
            while not (self._closed or self._queue or self._has_rows):
                if not self._changed.wait(IDLE_BEAT_S) and self._group is not None:
                    break  # idle for IDLE_BEAT_S: an empty decision keeps the others' wait short of the timeout
            closed = self._closed
            joining, cancelled = list(self._queue.values()), self._cancels if self._has_rows else []
            self._queue, self._cancels = {}, []
        if self._group is not None:
            import torch.distributed as dist

            # (None, None) stops the others' loops
            dist.broadcast_object_list([None, None] if closed else [joining, cancelled], src=0, group=self._group)
        return None if closed else (joining, cancelled)

    def _follow(self) -> Optional[Tuple[List[Joining], List[str]]]:
        """The other ranks: rank 0's next decision."""
        import torch.distributed as dist

        decision: List[Any] = [None, None]
        dist.broadcast_object_list(decision, src=0, group=self._group)
        return None if decision[0] is None else (decision[0], decision[1])
