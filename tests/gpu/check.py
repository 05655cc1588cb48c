"""The GPU check (issue 16): each parallelType on this host's CUDA devices through the real TorchServe, in fp16,
against single-process generate on GPU 0. Run by tests/gpu/check.sh; not part of the CPU suite.

On one GPU: tp with 1 rank (DeepSpeed kernel injection on, KERNEL_INJECT=0 turns it off), pp with 1 rank, and
custom split over GPU 0 and the CPU. With 2 or more GPUs tp and pp take 2 ranks. `--dry-run` runs the same steps on the CPU in fp32 (no kernel
injection, custom all on the CPU), to check the script before spending device time on it.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["hello world how are", "the quick brown fox jumps over the lazy dog .", "a request"]
NEW_TOKENS = 12
DRY_RUN = "--dry-run" in sys.argv[1:]
DEVICE, DTYPE = ("cpu", torch.float32) if DRY_RUN else ("cuda:0", torch.float16)


def reference(model_dir: Path) -> list:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).to(DEVICE).eval()
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").to(DEVICE)
        with torch.inference_mode():
            new = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids["input_ids"].shape[1]:]
        out.append(tokenizer.decode(new, skip_special_tokens=True))
    del model
    if not DRY_RUN:
        torch.cuda.empty_cache()
    return out


def configs(gpus: int, model_bytes: int) -> dict:
    from ts_plugin.testing import free_ports

    tp_port, pp_port = free_ports(2)
    ranks = min(gpus, 2)
    device_type = "cpu" if DRY_RUN else "gpu"
    handler = {"dtype": str(DTYPE).removeprefix("torch."), "max_new_tokens": 32, "max_length": 128}
    split = {"cpu": "8GiB"} if DRY_RUN else {0: f"{model_bytes // 2 // 1024}KiB", "cpu": "8GiB"}
    inject = not DRY_RUN and os.environ.get("KERNEL_INJECT", "1") == "1"
    return {
        "tp": {"parallelType": "tp", "deviceType": device_type, "batchSize": 4, "maxBatchDelay": 50,
               "torchrun": {"nproc-per-node": ranks, "rdzv-endpoint": f"localhost:{tp_port}"},
               "deepspeed": {"replace_with_kernel_inject": inject},
               "handler": handler},
        "pp": {"parallelType": "pp", "deviceType": device_type, "batchSize": 4, "maxBatchDelay": 50,
               "torchrun": {"nproc-per-node": ranks, "rdzv-endpoint": f"localhost:{pp_port}"},
               "pippy": {"chunks": 1}, "handler": handler},
        # about half of the layers on GPU 0, the rest on the CPU
        "custom": {"parallelType": "custom", "deviceType": device_type, "batchSize": 4, "maxBatchDelay": 50,
                   "handler": {**handler, "device_map": "sequential",
                               "max_memory": split}},
    }


def main() -> int:
    from ts_plugin.archive import archive
    from ts_plugin.testing import TorchServe, make_tiny_model

    if DRY_RUN:
        gpus = 1
        print(f"gpu check: dry run on the CPU, torch {torch.__version__}", flush=True)
    elif not torch.cuda.is_available():
        print("gpu check: no CUDA device (--dry-run runs the steps on the CPU)", file=sys.stderr)
        return 2
    else:
        gpus = torch.cuda.device_count()
        print(f"gpu check: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    work = Path(os.environ.get("CHECK_WORKDIR") or tempfile.mkdtemp(prefix="ts-plugin-gpu-"))
    model_dir = make_tiny_model(work / "tiny-llama", arch="llama", layers=8, hidden=256, shards=2)
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) // 2  # fp32 files, fp16 model
    expected = reference(model_dir)
    store = work / "model_store"
    store.mkdir(exist_ok=True)
    models = configs(gpus, model_bytes)
    for name, config in models.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        code = archive(["--model-name", name, "--version", "1.0", "--handler", str(REPO / "handlers/llm_handler.py"),
                        "--extra-files", str(model_dir), "--config-file", str(path), "--export-path", str(store),
                        "--archive-format", "no-archive", "--force"])
        if code != 0:
            print(f"gpu check: archiving {name} failed", file=sys.stderr)
            return 1
    results, ok = {}, True
    with TorchServe(work / "torchserve", store) as server:
        t0 = time.perf_counter()
        server.start(models={name: name for name in models}, timeout=240)
        print(f"gpu check: READY in {time.perf_counter() - t0:.0f} s", flush=True)
        for name in models:
            answers, tokens, t0 = [], 0, time.perf_counter()
            for prompt in PROMPTS:
                response = server.predict(name, {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS}})
                if response.status_code != 200:
                    answers.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    continue
                body = response.json()
                answers.append(body["generated_text"])
                tokens += body["details"]["completion_tokens"]
            seconds = time.perf_counter() - t0
            same = answers == expected
            ok &= same
            results[name] = {"same_as_generate": same, "tok_per_s": round(tokens / seconds, 1), "answers": answers}
            print(f"gpu check: {name}: same as single-process {DTYPE} generate: {same}; {tokens / seconds:.1f} tok/s",
                  flush=True)
        if not ok:
            print(server.log_tail(60))
    results["expected"] = expected
    text = json.dumps(results, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu-check.json").write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
