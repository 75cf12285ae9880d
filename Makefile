.PHONY: install lint format test bench repro

install:
	python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

test:
	.venv/bin/python -m pytest

repro:
	.venv/bin/python scripts/repro_parallel_tools.py

bench:
	.venv/bin/python scripts/bench_parallel_tools.py
	.venv/bin/python scripts/bench_pool_capacity.py
	.venv/bin/python scripts/bench_overhead.py
	.venv/bin/python scripts/bench_ledger_throughput.py
