"""Configs, archives and reference answers for the tests and the benchmark: a model packaged as a user packages it
(`ts-plugin archive`, the validator in front of torch-model-archiver) and the answers it must give (greedy HF
`generate` in one process)."""
from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

import yaml

from ..bundled import handler_file
from .processes import free_ports


def write_config(path: Union[str, Path], base: Union[str, Path], **overrides) -> Path:
    """`base` (a model-config.yaml) with some keys replaced (nested dicts merge), written to `path`. A torchrun
    model gets a free rendezvous port of its own unless the overrides give one, so models and test runs never
    share one (see rule TSP212)."""
    config = yaml.safe_load(Path(base).read_text(encoding="utf-8"))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    if isinstance(config.get("torchrun"), dict) and "rdzv-endpoint" not in overrides.get("torchrun", {}):
        config["torchrun"]["rdzv-endpoint"] = f"localhost:{free_ports(1)[0]}"
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return Path(path)


def archive_model(store: Union[str, Path], name: str, config: Union[str, Path],
                  model_dir: Optional[Union[str, Path]] = None, handler: Optional[Union[str, Path]] = None,
                  archive_format: str = "no-archive") -> None:
    """`ts-plugin archive` of `config` into `store` with ts_plugin's base handler (or the `handler` file of your
    own), with `model_dir` as the extra files (else the config's handler.model_path names the folder); raise
    with its output on failure."""
    from ..archive import archive

    handler = Path(handler) if handler is not None else handler_file()
    extra = ["--extra-files", str(Path(model_dir).resolve())] if model_dir is not None else []
    Path(store).mkdir(parents=True, exist_ok=True)
    output = io.StringIO()
    code = archive(["--model-name", name, "--version", "1.0", "--handler", str(handler.resolve()), *extra,
                    "--config-file", str(Path(config).resolve()), "--export-path", str(Path(store).resolve()),
                    "--archive-format", archive_format, "--force"], out=output, err=output)
    if code != 0:
        raise RuntimeError(f"ts-plugin archive {name} failed:\n{output.getvalue()}")


@lru_cache(maxsize=4)
def _reference_model(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def reference_answers(model_dir: Union[str, Path], jobs: Iterable[Tuple[str, int]]) -> List[Tuple[List[int], str]]:
    """Greedy HF `generate` in one process, one (prompt, max new tokens) at a time: the ground truth every layout
    must match, as (token ids up to the end of sequence, text). The last few models read stay loaded."""
    import torch

    model, tokenizer = _reference_model(str(model_dir))
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    answers = []
    for prompt, max_new in jobs:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            new = model.generate(**ids, max_new_tokens=max_new, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
        new = new[:next((i for i, token in enumerate(new) if token in eos_ids), len(new))]
        answers.append((new, tokenizer.decode(new, skip_special_tokens=True)))
    return answers
