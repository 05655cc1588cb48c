"""ts_plugin's handler in processes of its own, driven over pipes: the "without TorchServe" side of the benchmark.

    torchrun --nproc-per-node 2 -m bench.driver --config C   # the config's parallelType picks the engine
    python -m bench.driver --config C --threads 2   # custom: the single process

The handler gets a real TorchServe `Context` and is called with `handle(rows, context)` as TorchServe's worker
calls it: the same engine and generation loop, only no frontend, no socket protocol and no batching delay.
Rank 0 reads a JSON command per line on stdin and answers on stdout with a line that starts with `@bench `
(torchrun's ranks inherit both); it hands each command to the other ranks over a gloo group with a long
timeout, so idle ranks wait without spinning.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import yaml

from bench.procs import ANSWER
from ts_plugin.handlers import LLMHandler
from ts_plugin.testing import failed_statuses, start_batch, worker_context


class Job:
    def __init__(self, args):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if args.threads:
            torch.set_num_threads(args.threads)
        config = yaml.safe_load(Path(args.config).read_text())
        self.context = worker_context(config["handler"]["model_path"], config)
        self.handler = LLMHandler()  # the engine of the config's parallelType
        self.handler.initialize(self.context)  # pp: ranks 1.. start their follower loop here
        # commands travel on a group of their own: an idle rank waits in it for as long as the benchmark does
        # something else, which the handler's process group (responseTimeout) would not allow
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1)) if self.world > 1 else None

    def serve(self) -> None:
        self._answer({"ok": True})
        while True:
            command = json.loads(sys.stdin.readline() or '{"op": "stop"}') if self.rank == 0 else None
            if self.world > 1:
                box = [command]
                dist.broadcast_object_list(box, src=0, group=self.group)
                command = box[0]
            try:
                result = {"ok": True, **(self.execute(command) or {})}
            except Exception as error:  # noqa: BLE001 - reported to the benchmark, which raises
                result = {"ok": False, "error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
            self._answer(result)
            if command["op"] == "stop":
                return

    def _answer(self, result: Dict[str, Any]) -> None:
        if self.rank == 0:
            print(ANSWER + json.dumps(result), flush=True)

    def execute(self, command: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        if command["op"] == "stop":
            if self.rank == 0:
                self.handler.shutdown()
            return None
        if command["op"] != "generate":
            raise ValueError(f"unknown op {command['op']!r}")
        if self.handler.layout.parallel_type == "pp" and self.rank != 0:
            return None  # the follower loop does this rank's work
        forwards = contextlib.nullcontext()
        if command.get("deepspeed_forwards"):  # tp: DeepSpeed's own layer forwards, every rank alike
            from ts_plugin.engines._cpu_tp import deepspeed_layer_forwards

            forwards = deepspeed_layer_forwards(self.handler.model.model)
        with forwards:
            return self.generate(command["prompts"], command["max_new_tokens"], command.get("chunks"))

    def generate(self, prompts: List[str], max_new: int, chunks: Optional[int]) -> Dict[str, Any]:
        if chunks is not None:
            self.handler.model.chunks = int(chunks)
        rows = [{"body": json.dumps({"inputs": p, "parameters": {"max_new_tokens": max_new}}).encode()}
                for p in prompts]
        start_batch(self.context, len(rows))
        results: List[Any] = []
        inference = self.handler.inference

        def keep_results(requests, on_step=None):  # the token ids and timings behind the JSON answers
            results.extend(inference(requests, on_step))
            return results

        self.handler.inference = keep_results
        try:
            started = time.perf_counter()
            responses = self.handler.handle(rows, self.context)  # what TorchServe's worker calls
            seconds = time.perf_counter() - started
        finally:
            del self.handler.inference
        if failed_statuses(self.context):
            raise RuntimeError(f"handle answered {failed_statuses(self.context)}: {responses}")
        texts = [response["generated_text"] for response in responses]
        return {"seconds": seconds, "texts": texts, "token_ids": [r.token_ids for r in results],
                "ttft_s": [r.time_to_first_token_s for r in results], "gen_s": [r.seconds for r in results]}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.driver")
    parser.add_argument("--config", required=True, help="model-config.yaml")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job = Job(args)
    except Exception:
        if int(os.environ.get("RANK", 0)) == 0:
            print(ANSWER + json.dumps({"ok": False, "error": traceback.format_exc()}), flush=True)
        raise
    job.serve()
    if dist.is_initialized():
        dist.barrier(group=job.group)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
