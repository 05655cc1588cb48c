#!/usr/bin/env bash
# The GPU check (issue 16), at most 5 minutes: tp, pp and custom through the real TorchServe on this host's
# CUDA devices in fp16, each against single-process generate (tests/gpu/check.py says what runs).
# Needs what `make test` installs, with a CUDA torch (TORCH_SPEC, see the README) and Java 11+ for
# TorchServe. Exit 0: every answer equal; 1: a difference or a failed step; 2: no CUDA device.
# The figures go to stdout, and to $OUT/gpu-check.json when OUT is set.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 300 "$python" "$repo/tests/gpu/check.py" "$@"
