.PHONY: install lint format typecheck imports test wheel-check check bench repro

install:
	python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

# mypy and import-linter see the installed `agentrt` namespace through a link tree (build/namespace).
typecheck:
	.venv/bin/python scripts/namespace_tree.py >/dev/null
	.venv/bin/mypy
	PYTHONPATH=build/namespace .venv/bin/lint-imports

imports: typecheck

test:
	.venv/bin/python -m pytest

wheel-check:
	.venv/bin/python scripts/check_wheel_install.py

# Everything .ci/run checks, in the existing virtual environment.
check: lint typecheck test wheel-check

repro:
	.venv/bin/python scripts/repro_parallel_tools.py

bench:
	.venv/bin/python scripts/bench_parallel_tools.py
	.venv/bin/python scripts/bench_pool_capacity.py
	.venv/bin/python scripts/bench_overhead.py
	.venv/bin/python scripts/bench_ledger_throughput.py
	.venv/bin/python scripts/bench_long_conversation.py
	.venv/bin/python scripts/bench_http.py
	.venv/bin/python scripts/bench_restart.py
	.venv/bin/python scripts/bench_budgets.py
	.venv/bin/python scripts/bench_cli_startup.py
	.venv/bin/python scripts/bench_tracing.py
	.venv/bin/python scripts/bench_rls.py
	.venv/bin/python scripts/bench_loop_stalls.py
	.venv/bin/python scripts/bench_workers.py  # last: it needs pgbouncer, and stops make without it
