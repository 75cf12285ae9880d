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
