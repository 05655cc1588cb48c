# The two commands a fresh clone needs. Both create/reuse .venv and install everything first.
.PHONY: demo test venv bench

venv:
	@./scripts/bootstrap.sh

demo: venv
	.venv/bin/ts-plugin demo

test: venv
	./scripts/run-tests.sh

bench: venv
	.venv/bin/python -m pip install -q -e ".[bench]"
	.venv/bin/python -m bench.run
	.venv/bin/python -m bench.serving
	.venv/bin/python -m bench.serving --model smollm2
