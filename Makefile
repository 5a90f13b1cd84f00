# The two set-up commands of the README: `make dev` runs the whole system locally without
# Docker, `make test` runs the test suite (all three tiers). Both create (or reuse) .venv
# themselves. `make test-unit` runs the fast tier alone (tests/unit: no servers needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test test-unit lint fmt venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

dev: $(STAMP)
	$(BIN)/eventsched dev $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check eventsched tests $(wildcard bench)
	$(BIN)/ruff format --check eventsched tests $(wildcard bench)
	$(BIN)/mypy --strict eventsched

fmt: $(STAMP)
	$(BIN)/ruff format eventsched tests $(wildcard bench)
	$(BIN)/ruff check --fix eventsched tests $(wildcard bench)

clean:
	rm -rf $(VENV) .eventsched .mypy_cache .ruff_cache .pytest_cache
