"""ts_plugin's CPU kernels (engines/_cpu_kernels.cpp): small_linear gives F.linear's result to float32 rounding
for every row count and shape, and a model switched to it takes it for a decode step's rows (and only those),
with the same greedy tokens as its own linears, behind Accelerate's hooks too."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ts_plugin.engines import _cpu_kernels
from ts_plugin.engines._cpu_kernels import load_cpu_kernels, use_small_batch_linears


@pytest.fixture(scope="module")
def kernels():
    why = load_cpu_kernels()
    if why is not None:
        pytest.skip(f"no C++ toolchain here: {why}")
    return _cpu_kernels.built()


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("in_features,out_features", [(64, 48), (100, 7), (576, 1536), (1100, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_small_linear_gives_linears_result(kernels, rows, in_features, out_features, bias):
    generator = torch.Generator().manual_seed(rows * in_features + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    b = torch.randn(out_features, generator=generator) if bias else None
    expected = torch.nn.functional.linear(x, weight, b)
    got = kernels.small_linear(x, weight, b)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if b is not None:  # the output is a tensor of its own, never the bias broadcast
        assert got.data_ptr() != b.data_ptr()
        torch.testing.assert_close(kernels.small_linear(x, weight, b), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 576), (2, 1, 576), (5, 576), (1, 40, 576), (300, 576), (4, 0)])
def test_the_compiled_steps_op_gives_linears_result_for_any_rows(kernels, shape):
    """ts_plugin::small_linear (the compiled step's linear): small_linear within linear_plan's rows, oneDNN's or
    aten's linear past them, in the input's own shape; a tp rank's empty slice of columns too. And `linear`, the
    eager step's, the same."""
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(1536, shape[-1], generator=generator)
    bias = torch.randn(1536, generator=generator)
    expected = torch.nn.functional.linear(x, weight, bias)
    with torch.inference_mode():
        for got in (torch.ops.ts_plugin.small_linear(x, weight, bias), _cpu_kernels.linear(x, weight, bias)):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_the_plan_keeps_mkl_on_intels_cpus_and_takes_onednn_elsewhere():
    assert _cpu_kernels.linear_plan(8, "GenuineIntel", True) == (3, 8, False)  # MKL's fast paths: 1-2 rows, past 8
    assert _cpu_kernels.linear_plan(8, "AuthenticAMD", True) == (1, 12, True)
    assert _cpu_kernels.linear_plan(4, "HygonGenuine", False) == (1, 6, False)  # a torch without oneDNN: aten's


class _Counting:
    """The loaded kernels, counting small_linear's calls by row count."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def small_linear(self, x, weight, bias):
        self.rows.append(x.shape[0])
        return self.inner.small_linear(x, weight, bias)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture()
def counting(kernels):
    counted = _Counting(kernels)
    _cpu_kernels.KERNELS[0] = counted
    yield counted
    _cpu_kernels.KERNELS[0] = kernels


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_takes_the_kernel_for_a_decode_steps_rows_and_generates_the_same_tokens(counting, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from ts_plugin.testing import make_tiny_model

    path = make_tiny_model(tmp_path / arch, arch=arch)
    reference = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    linears = [module for module in model.modules() if type(module) is torch.nn.Linear]
    assert use_small_batch_linears(model) == len(linears) > 0
    assert use_small_batch_linears(model) == 0  # switched once
    ids = torch.randint(0, reference.config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    # the prompt's 36 rows take the linears' own path; each decode step's 4 rows the kernel
    assert counting.rows and set(counting.rows) == {4}


def test_accelerates_hook_stays_in_front_of_the_kernel(counting):
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Doubling(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return tuple(2 * arg for arg in args), kwargs

    linear = torch.nn.Linear(32, 16)
    add_hook_to_module(linear, Doubling())
    x = torch.randn(5, 32)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(2 * x, linear.weight, linear.bias)
        assert use_small_batch_linears(linear) == 1
        torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)
    assert counting.rows == [5]


def test_linears_the_kernel_cannot_run_keep_their_own_path(counting):
    half = torch.nn.Linear(32, 16).to(torch.bfloat16)
    assert use_small_batch_linears(half) == 0
    linear = torch.nn.Linear(32, 16)
    use_small_batch_linears(linear)
    x = torch.randn(4, 32, requires_grad=True)
    linear(x).sum().backward()  # training: autograd needs the linear's own op
    assert x.grad is not None and counting.rows == []


def test_a_stale_build_lock_leaves_pytorchs_ops_in_bounded_time(tmp_path):
    """torch waits for an extension's build lock without a bound; one left by a process killed while building
    hung every later worker at load. The kernels give up after the wait, with the reason, and the model runs."""
    script = (
        "import time, torch\n"
        "from torch.utils.cpp_extension import _get_build_directory\n"
        "from pathlib import Path\n"
        "from ts_plugin.engines import _cpu_kernels\n"
        "name = 'ts_plugin_cpu_kernels_' + torch.backends.cpu.get_cpu_capability().lower()\n"
        "Path(_get_build_directory(name, verbose=False), 'lock').write_text('')\n"
        "started = time.monotonic()\n"
        "why = _cpu_kernels.load_cpu_kernels(lock_wait_s=1.0)\n"
        "assert time.monotonic() - started < 10 and 'build lock' in why and _cpu_kernels.built() is None, why\n"
        "layer = torch.nn.Linear(8, 4)\n"
        "assert _cpu_kernels.use_small_batch_linears(layer) == 0\n"
        "x = torch.randn(5, 8)\n"
        "torch.testing.assert_close(_cpu_kernels.linear(x, layer.weight), x @ layer.weight.t())\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_build_lock_older_than_any_build_is_removed_and_a_recent_one_waited_for(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    from ts_plugin.engines._cpu_kernels import STALE_LOCK_S, wait_for_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = Path(_get_build_directory("some_op", verbose=False), "lock")
    lock.write_text("")
    with pytest.raises(RuntimeError, match="stayed for 1 s"):
        wait_for_build_lock("some_op", 1.0)
    assert lock.exists()  # a build may still hold it
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    wait_for_build_lock("some_op", 1.0)
    assert not lock.exists()


def test_the_compiled_steps_attention_op_attends_in_cpp_where_every_row_decodes(kernels):
    """ts_plugin::paged_attention_cpu inside compiled_step: a step whose rows all decode writes the pool and attends
    in C++ without calling the Python attention; a step with a prefilling row calls it, once a layer. Both leave
    the pool and the output as the Python attention (_attend) does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ts_plugin.engines import _paged
    from ts_plugin.engines._paged import KVPool, PagedBatch, PagedRow, compiled_step, use_paged_attention

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    use_paged_attention(model)
    modules = {module.layer_idx: module for module in model.modules() if type(module) in _paged._INNER}
    calls = []

    def counted(*args):
        calls.append(args[3])
        return _paged._attend_step(*args)

    steps = [[PagedRow([0], 5, 5), PagedRow([1], 3, 3)],  # prefill
             [PagedRow([0], 6, 1), PagedRow([1], 4, 1)],  # decode
             [PagedRow([0, 2], 17, 1), PagedRow([1], 5, 1)],  # decode, the pool grown to block 2
             [PagedRow([0, 2], 18, 1), PagedRow([3], 4, 4)]]  # a row decodes, one prefills
    python_pool, cpp_pool = KVPool(16), KVPool(16)
    generator = torch.Generator().manual_seed(0)
    kernels.set_attention_fallback(counted)
    try:
        for rows in steps:
            calls.clear()
            python_batch, cpp_batch = PagedBatch(python_pool, rows), PagedBatch(cpp_pool, rows)
            tokens = cpp_batch.tokens
            for layer, module in modules.items():
                q, k, v = (torch.randn(1, heads, tokens, 16, generator=generator) for heads in (4, 2, 2))
                expected = _paged._attend(module, q, k, v, python_batch, 0.25, {})
                with compiled_step(cpp_batch, modules):
                    got = torch.ops.ts_plugin.paged_attention_cpu(q, k, v, layer, 0.25, 0)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            decoding = all(row.new == 1 for row in rows)
            assert calls == ([] if decoding else list(modules)), rows
            for layer in modules:
                for cpp_part, python_part in zip(cpp_pool.layers[layer], python_pool.layers[layer]):
                    assert torch.equal(cpp_part, python_part)
    finally:
        kernels.set_attention_fallback(_paged._attend_step)
