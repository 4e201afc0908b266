# The two commands the README starts with. Both install what is missing first.
.PHONY: demo test setup lint typecheck pytest bench fuzz clean

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

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
