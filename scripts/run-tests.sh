#!/usr/bin/env bash
# The README's test command (`make test`): install if needed, then run the whole suite.
# pytest's exit 5 (no tests collected) is a failure here.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/bootstrap.sh" || exit 1
cd "$repo"
.venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "run-tests: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
