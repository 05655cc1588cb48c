"""parallelType pp engine without TorchServe: the pipeline handler under `torchrun --nproc-per-node 2`
(gloo on CPU), tiny random-weight Llama and GPT-2, checked token for token against single-process
HuggingFace `generate`. Plus the split rules and the load errors, in-process."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from _llm import REPO, TORCHRUN, load_on_two_ranks
from ts_plugin.testing import free_ports

PROMPTS = ["hello world how are", "the quick brown fox jumps over the lazy dog .", "a request"]
MAX_NEW = [12, 5, 9]

CONFIG = {
    "minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 200, "responseTimeout": 120,
    "deviceType": "cpu", "parallelType": "pp", "torchrun": {"nproc-per-node": 2},
    "pippy": {"chunks": 1, "model_type": "HF", "input_names": ["input_ids"], "rpc_timeout": 600,
              "num_worker_threads": 64},
    "handler": {"max_new_tokens": 16},
}

# Runs on both ranks. Rank 0 drives the handler as TorchServe would (handle() with request rows); rank 1 only
# initializes (its follower loop runs in the background, as in a real worker).
SCRIPT = textwrap.dedent(r'''
    import json, logging, os, sys, time
    from pathlib import Path

    import torch.distributed as dist
    import yaml

    from ts_plugin.handlers import LLMHandler
    from ts_plugin.testing import failed_statuses, start_batch, worker_context

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    cases = json.loads(sys.argv[3])  # [[config file, idle seconds before the last request, exit without STOP], ...]
    prompts, max_new = json.loads(sys.argv[4]), json.loads(sys.argv[5])


    def row(body):
        return {"body": json.dumps(body).encode() if isinstance(body, dict) else body}


    def handle_batch(handler, bodies, ctx):
        start_batch(ctx, len(bodies))  # as the worker does before each batch
        return handler.handle([row(body) for body in bodies], ctx)


    results = {}
    for config_file, idle, exit_without_stop in cases:
        handler = LLMHandler()
        ctx = worker_context(model_dir, yaml.safe_load((model_dir / config_file).read_text()), config_file=config_file)
        handler.initialize(ctx)
        rank = handler.ranks.rank
        if rank != 0:
            follower = handler.follower
            # fault injection for the test: this stage fails on prompts of 40+ tokens
            run = follower.stage.run

            def failing_run(inputs, batch, run=run):
                if max(row.new for row in batch.rows) >= 40:
                    raise RuntimeError("injected stage failure")
                return run(inputs, batch)

            follower.stage.run = failing_run
            follower.thread.join(timeout=300)
            info = follower.stage.info
            results[config_file] = {"stopped": not follower.thread.is_alive(), "steps": follower.steps,
                                    "own_layers_only": sorted(follower.stage.pool.layers) == list(range(info.start,
                                                                                                      info.end))}
            continue
        case = {"chunks": handler.model.chunks}
        # three prompts of different lengths in one batch
        bodies = [{"inputs": p, "parameters": {"max_new_tokens": n}} for p, n in zip(prompts, max_new)]
        case["batch"] = handle_batch(handler, bodies, ctx)
        # the same batch through inference(), for the token ids
        parsed = handler.preprocess([row(b) for b in bodies])
        case["token_ids"] = [r.token_ids for r in handler.inference(parsed)]
        # a bad request (invalid JSON) in a batch of its own, then in a batch between two good ones; then a batch
        # smaller than chunks
        case["bad"] = handle_batch(handler, [b"{not json"], ctx)
        case["bad_status"] = failed_statuses(ctx)
        case["mixed"] = handle_batch(handler, [bodies[1], b"{not json", bodies[2]], ctx)
        case["mixed_status"] = failed_statuses(ctx)
        case["single"] = handle_batch(handler, [bodies[0]], ctx)  # smaller than chunks
        # a stage fails on another rank: this batch fails on rank 0 too, the next one works
        try:
            handle_batch(handler, [{"inputs": "hello " * 60}, bodies[2]], ctx)
            case["stage_failure"] = None
        except RuntimeError as error:
            case["stage_failure"] = str(error)
        case["after_failure"] = handle_batch(handler, [bodies[2]], ctx)
        # longer idle than the process-group timeout: the followers wait for the next job without timing out
        time.sleep(idle)
        case["plain"] = handle_batch(handler, [prompts[1].encode()], ctx)  # the handler's default max_new_tokens
        results[config_file] = case
        if exit_without_stop:
            # the worker goes away without a word: the follower loop must end on its own
            (out_dir / "rank0.json").write_text(json.dumps(results))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        handler.shutdown()
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()
''')


def legacy_bin_checkpoint(folder: Path, strip_prefix: str = "") -> Path:
    """Turn a saved model folder into a single pytorch_model.bin, optionally with the keys of the base model
    (as the original GPT-2 checkpoint has them: `h.0.attn...`, no `transformer.` prefix, no lm_head)."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
        file.unlink()
    for index in folder.glob("*.index.json"):
        index.unlink()
    if strip_prefix:
        state = {key[len(strip_prefix):]: value for key, value in state.items() if key.startswith(strip_prefix)}
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from ts_plugin.testing import make_tiny_model

    root = tmp_path_factory.mktemp("pp-engine")
    return {"llama": make_tiny_model(root / "llama", arch="llama", shards=2),  # sharded safetensors
            "gpt2": legacy_bin_checkpoint(make_tiny_model(root / "gpt2", arch="gpt2"), "transformer.")}


def reference_ids(model_dir: Path, prompt: str, max_new_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    if eos in new:
        new = new[:new.index(eos)]
    return new, tokenizer.decode(new, skip_special_tokens=True)


def run_pipeline(tmp_path: Path, model_dir: Path, cases) -> tuple:
    script = tmp_path / "pp_engine_script.py"
    script.write_text(SCRIPT)
    for config_file, chunks, extra, _ in cases:
        config = {**CONFIG, "pippy": {**CONFIG["pippy"], "chunks": chunks, **extra}}
        (model_dir / config_file).write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    plan = [[config_file, idle, i == len(cases) - 1] for i, (config_file, _, _, idle) in enumerate(cases)]
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_ports(1)[0]),
           str(script), str(model_dir), str(tmp_path), json.dumps(plan), json.dumps(PROMPTS), json.dumps(MAX_NEW)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-8000:]
    return json.loads((tmp_path / "rank0.json").read_text()), json.loads((tmp_path / "rank1.json").read_text()), log


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pipeline_matches_single_process_generate(tmp_path, models, arch):
    model_dir = models[arch]
    # chunks 2, then chunks 1 with the stages split at an explicit layer; the last run's rank 0 exits
    # without STOP, like a worker that is killed
    # (the second run also has a 2 s process-group timeout and stays idle for 3.5 s before its last request)
    cases = [("pp-chunks2.yaml", 2, {}, 0), ("pp-chunks1.yaml", 1, {"rpc_timeout": 2, "split_points": [
        "model.layers.1" if arch == "llama" else "transformer.h.1"]}, 3.5)]
    rank0, rank1, log = run_pipeline(tmp_path, model_dir, cases)
    expected = [reference_ids(model_dir, p, n) for p, n in zip(PROMPTS, MAX_NEW)]
    plain = reference_ids(model_dir, PROMPTS[1], CONFIG["handler"]["max_new_tokens"])
    for config_file, chunks, _, _ in cases:
        case = rank0[config_file]
        assert case["chunks"] == chunks
        for answer, ids, (ref_ids, ref_text), n in zip(case["batch"], case["token_ids"], expected, MAX_NEW):
            assert ids == ref_ids
            assert answer["generated_text"] == ref_text
            assert answer["details"]["completion_tokens"] == len(ref_ids)
            assert answer["details"]["finish_reason"] == ("length" if len(ref_ids) == n else "eos_token")
        assert case["bad_status"] == {"0": 400} and "invalid JSON" in case["bad"][0]["error"]
        assert case["mixed_status"] == {"1": 400}
        assert case["mixed"][0]["generated_text"] == expected[1][1]
        assert case["mixed"][2]["generated_text"] == expected[2][1]
        assert case["single"][0]["generated_text"] == expected[0][1]
        assert "pipeline stage failed" in case["stage_failure"]
        assert case["after_failure"][0]["generated_text"] == expected[2][1]
        assert case["plain"][0]["generated_text"] == plain[1]
    # STOP ended the follower loop; the stage's KV pool holds its own layers only
    assert rank1["pp-chunks2.yaml"] == {"stopped": True, "steps": rank1["pp-chunks2.yaml"]["steps"],
                                        "own_layers_only": True}
    assert rank1["pp-chunks2.yaml"]["steps"] > 0
    # rank 0 went away without STOP: the loop ended on the closed connection
    assert rank1["pp-chunks1.yaml"]["stopped"] is True
    assert "pipeline follower loop ended" in log
    assert "injected stage failure" in log
    assert "pipeline follower loop stopped" in log
    # the legacy PiPPy keys are said once (rank 0), and each rank says what it holds
    assert log.count("pippy.rpc_timeout 600 s is used as the process-group timeout") == 1
    assert log.count("pippy.rpc_timeout 2 s is used as the process-group timeout") == 1
    assert log.count("pippy.num_worker_threads 64 is accepted and ignored") == len(cases)
    assert "pipeline stage 1/2" in log and "pipeline stage 2/2" in log and "peak RSS" in log
    assert "3 sequence(s) in 2 group(s) of rows" in log and "1 sequence(s) in 1 group(s) of rows" in log
    assert "model.layers.0..0 + input embedding" in log if arch == "llama" else "transformer.h.0..0" in log


def test_a_rank_that_cannot_load_its_stage_fails_the_load_on_every_rank(tmp_path, models):
    """Only the last stage misses a tensor (lm_head): both ranks fail promptly, none waits in a collective."""
    import shutil

    import torch

    model_dir = tmp_path / "broken"
    shutil.copytree(models["llama"], model_dir)
    legacy_bin_checkpoint(model_dir)
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    del state["lm_head.weight"]
    torch.save(state, model_dir / "pytorch_model.bin")
    (model_dir / "pp-chunks1.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    first, last = load_on_two_ranks(model_dir, "pp-chunks1.yaml", tmp_path)
    assert first == "EngineError: another rank failed to load its pipeline stage; its model log says why"
    assert last.startswith("CheckpointError: 1 tensor(s) of stage 1 are not in the checkpoint")
    assert "lm_head.weight" in last


# --- in-process: splitting and load errors -----------------------------------------------------------------------

def test_even_split_and_split_points():
    from ts_plugin.engines.pipeline import PipelineError, stage_bounds

    def even(layers):
        return [1] * layers

    assert stage_bounds(even(4), 2, "model.layers") == [(0, 2), (2, 4)]
    assert stage_bounds(even(5), 2, "model.layers") == [(0, 3), (3, 5)]
    assert stage_bounds(even(8), 3, "model.layers") == [(0, 3), (3, 6), (6, 8)]
    assert stage_bounds(even(4), 2, "model.layers", ["model.layers.1"]) == [(0, 1), (1, 4)]
    assert stage_bounds(even(4), 2, "model.layers", ["model.layers.1"], head_cost=9) == [(0, 1), (1, 4)]
    assert stage_bounds(even(6), 3, "transformer.h", ["transformer.h.2", "transformer.h.5"]) == [(0, 2), (2, 5),
                                                                                                 (5, 6)]
    with pytest.raises(PipelineError, match="needs? 1"):
        stage_bounds(even(4), 2, "model.layers", ["model.layers.1", "model.layers.2"])
    with pytest.raises(PipelineError, match="not a decoder layer"):
        stage_bounds(even(4), 2, "model.layers", ["model.norm"])
    with pytest.raises(PipelineError, match="must be increasing"):
        stage_bounds(even(4), 2, "model.layers", ["model.layers.4"])
    with pytest.raises(PipelineError, match="only 2 decoder layers"):
        stage_bounds(even(2), 3, "model.layers")


def test_the_default_split_balances_the_stages_with_the_lm_head():
    """The last stage also runs the LM head: the default split gives it fewer layers, so that the slowest stage
    (the pipeline's pace) costs least."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ts_plugin.engines.pipeline import decode_costs, find_layer_list, stage_bounds

    # SmolLM2-135M's shape: 30 layers of 14.2 MB (fp32) and a 576 x 49,152 head of 113 MB (tied to the input
    # embedding), about 4 layers' decode time
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers_path, layers = find_layer_list(model)
    layer_costs, head_cost = decode_costs(model, layers)
    assert 3.9 < head_cost / layer_costs[0] < 4.1
    assert stage_bounds(layer_costs, 2, layers_path, head_cost=head_cost) == [(0, 17), (17, 30)]
    assert stage_bounds(layer_costs, 3, layers_path, head_cost=head_cost) == [(0, 11), (11, 22), (22, 30)]
    # the split minimises the slowest stage; of equal ones, earlier stages take more
    assert stage_bounds([1, 1, 1, 1], 2, "layers", head_cost=2) == [(0, 3), (3, 4)]
    assert stage_bounds([1, 1, 1, 1], 2, "layers", head_cost=1) == [(0, 3), (3, 4)]
    assert stage_bounds([5, 1, 1, 1], 2, "layers") == [(0, 1), (1, 4)]
    assert stage_bounds([1, 1, 1, 1], 4, "layers", head_cost=100) == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("arch, path", [("llama", "model.layers"), ("gpt2", "transformer.h"),
                                        ("opt", "model.decoder.layers")])
def test_layer_list_is_found(tmp_path, arch, path):
    from ts_plugin.engines._checkpoint import build_meta_model
    from ts_plugin.engines.pipeline import find_layer_list
    from ts_plugin.testing import make_tiny_model

    import torch

    model = build_meta_model(make_tiny_model(tmp_path / arch, arch=arch), torch.float32)
    found, layers = find_layer_list(model)
    assert found == path and len(layers) == 4


def test_model_without_a_layer_list_gets_a_clear_error():
    import torch
    from transformers import LlamaConfig

    from ts_plugin.engines.pipeline import PipelineError, find_layer_list

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(num_hidden_layers=3)
            self.blocks = torch.nn.Sequential(torch.nn.Linear(2, 2))

    with pytest.raises(PipelineError, match="cannot split Odd"):
        find_layer_list(Odd())


def test_encoder_decoder_model_is_refused(tmp_path):
    import torch
    from transformers import T5Config

    from ts_plugin.engines._checkpoint import build_meta_model
    from ts_plugin.engines.base import EngineError

    T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(EngineError, match="T5Config is an encoder-decoder"):
        build_meta_model(tmp_path, torch.float32)


@pytest.mark.parametrize("family, stages", [("mistral", 3), ("qwen2", 2), ("gpt_neox", 3), ("phi", 2), ("phi3", 2),
                                            ("opt", 3)])
def test_other_families_split_in_process(tmp_path, family, stages):
    """Stages chained in one process (no transport) give HF's greedy tokens, for other decoder families."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from ts_plugin.continuous import generate
    from ts_plugin.engines._checkpoint import build_meta_model
    from ts_plugin.engines._paged import PagedBatch
    from ts_plugin.engines.base import StepModel
    from ts_plugin.engines._checkpoint import materialize_stage
    from ts_plugin.engines.pipeline import PipelineStage, find_layer_list, stage_bounds
    from ts_plugin.requests import SamplingParams
    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path / family, arch=family)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()

    class Chain(StepModel):
        samples_here = True

        def __init__(self, parts):
            self.parts = parts
            self.pool = parts[0].pool

        def forward(self, ids, batch):
            for part in self.parts:  # each stage over its own pool, from the rows as a later stage receives them
                ids = part.run(ids, PagedBatch.from_ints(part.pool, batch.to_ints()))
            return ids

        def share_tokens(self, tokens):
            return tokens

    parts = []
    for index in range(stages):
        model = build_meta_model(path, torch.float32)
        layers_path, layers = find_layer_list(model)
        info = materialize_stage(model, index, stage_bounds([1] * len(layers), stages, layers_path), layers_path, path,
                                 torch.device("cpu"), torch.float32)
        parts.append(PipelineStage(model, info, torch.device("cpu"), torch.float32))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    results = generate(Chain(parts), tokenizer, prompts, [SamplingParams(max_new_tokens=8) for _ in prompts], 0,
                       [tokenizer.eos_token_id])
    for ids, result in zip(prompts, results):
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=8, do_sample=False)
        expected = out[0, len(ids):].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[:expected.index(tokenizer.eos_token_id)]
        assert result.token_ids == expected


def test_single_rank_pipeline_serves_in_process(tmp_path, monkeypatch, models):
    """parallelType pp with nproc-per-node 1 (a pipeline of one stage): no process group, same answers."""
    from ts_plugin.handlers import LLMHandler
    from ts_plugin.testing import failed_statuses, worker_context

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    model_dir = models["gpt2"]
    config = {**CONFIG, "torchrun": {"nproc-per-node": 1}, "pippy": {"chunks": 2}}
    (model_dir / "pp-single.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows = [{"body": json.dumps({"inputs": p, "parameters": {"max_new_tokens": n}}).encode()}
            for p, n in zip(PROMPTS, MAX_NEW)] + [{"body": b"{not json"}]
    context = worker_context(model_dir, config, config_file="pp-single.yaml", batch_size=len(rows))
    handler = LLMHandler()
    handler.initialize(context)
    answers = handler.handle(rows, context)
    for answer, prompt, n in zip(answers, PROMPTS, MAX_NEW):
        assert answer["generated_text"] == reference_ids(model_dir, prompt, n)[1]
    assert failed_statuses(context) == {3: 400}
    handler.shutdown()

