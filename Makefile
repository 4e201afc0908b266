# The two commands the README starts with. Both install what is missing first.
.PHONY: demo test setup lint typecheck pytest bench bench-fleet bench-fleet-procs soak fuzz clean

VENV := .venv
BIN := $(VENV)/bin

setup:
	@scripts/setup.sh

demo: setup
	$(BIN)/vtpm demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test: setup lint typecheck pytest

bench: setup
	$(BIN)/python bench/run_all.py

# fleet scale on PostgreSQL (1k, 10k, 100k attesters; a few minutes): docs/operations.md
bench-fleet: setup
	$(BIN)/python bench/fleet.py $(FLEET_ARGS)

# 1-3 verifier masters on one PostgreSQL, 1-2 CA masters on one ledger (a few minutes): docs/operations.md
bench-fleet-procs: setup
	$(BIN)/python bench/fleet_procs.py $(FLEET_PROCS_ARGS)

# the soak with faults (two verifiers, PostgreSQL restarts, a full SQLite disk; root):
# docs/operations.md. SOAK_SECONDS: the PostgreSQL run's length
SOAK_SECONDS ?= 600
soak: setup
	PYTHONPATH=$(CURDIR) $(BIN)/python -m tests.soak.driver --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
