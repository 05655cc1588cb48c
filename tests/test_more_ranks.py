"""Under real torchrun (gloo on CPU), each token for token against single-process generate: tp 3 and tp 4
(DeepSpeed's own all-reduce path; the socket link serves 2 ranks only), pp 3 (a follower that forwards to
another follower), and pptp's tensor-parallel plan on the architectures beyond Llama that have one."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from _llm import PROMPTS, REPO, TORCHRUN
from ts_plugin.testing import free_ports, make_tiny_model

MAX_NEW = [9, 4, 7]

SCRIPT = textwrap.dedent(r'''
    import json, logging, os, sys
    from pathlib import Path

    from ts_plugin.handlers import LLMHandler
    from ts_plugin.testing import worker_context

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model_dir, prompts, max_new = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
    config = json.loads((model_dir / "ranks.json").read_text())
    handler = LLMHandler()
    handler.initialize(worker_context(model_dir, config))
    if handler.follower is not None:
        handler.follower.thread.join(timeout=240)  # until rank 0's STOP
    else:
        rows = [{"body": json.dumps({"inputs": p, "parameters": {"max_new_tokens": n}}).encode()}
                for p, n in zip(prompts, max_new)]
        answers = handler.inference(handler.preprocess(rows))
        (model_dir / f"rank{handler.ranks.rank}.json").write_text(json.dumps([a.token_ids for a in answers]))
        handler.shutdown()
    os._exit(0)  # no gloo teardown race at exit
''')

CASES = {  # name -> (parallelType, ranks, architecture, model config overrides)
    "tp3": ("tp", 3, "llama", {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden": 96}),
    "tp4": ("tp", 4, "llama", {"num_attention_heads": 8, "num_key_value_heads": 4, "hidden": 128}),
    "pp3": ("pp", 3, "llama", {}),
    # one stage of 2 tp ranks: the model's own tp plan, which is what differs per architecture
    "pptp-mistral": ("pptp", 2, "mistral", {}),
    "pptp-qwen2": ("pptp", 2, "qwen2", {}),
    "pptp-gpt_neox": ("pptp", 2, "gpt_neox", {}),
    "pptp-phi": ("pptp", 2, "phi", {}),
}


def reference_ids(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for prompt, n in zip(PROMPTS, MAX_NEW):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            new = model.generate(**ids, max_new_tokens=n, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        out.append(new[:new.index(eos)] if eos in new else new)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_more_ranks_match_single_process_generate(tmp_path, case):
    kind, ranks, arch, overrides = CASES[case]
    model_dir = make_tiny_model(tmp_path / case, arch=arch, shards=2, **overrides)
    config = {"parallelType": kind, "deviceType": "cpu", "torchrun": {"nproc-per-node": ranks},
              "handler": {"max_new_tokens": 16}}
    if kind == "pptp":
        config["pippy"] = {"pp_size": 1}
    (model_dir / "ranks.json").write_text(json.dumps(config))
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    result = subprocess.run([str(TORCHRUN), "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
                             "--master-port", str(free_ports(1)[0]), str(script), str(model_dir), json.dumps(PROMPTS),
                             json.dumps(MAX_NEW)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    expected = reference_ids(model_dir)
    drivers = [0] if kind == "pp" else range(ranks)
    for rank in drivers:
        assert json.loads((model_dir / f"rank{rank}.json").read_text()) == expected, rank
    if kind == "pp":
        assert "pipeline stage 3/3" in result.stderr + result.stdout
