# Developer and CI entry points. `make test` is the test command CI runs (.ci/run).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the dependencies may have changed.
STAMP := $(VENV)/.installed-from-pyproject
# A hung test must not use up CI's time: SIGINT first, so pytest prints its summary and tears its
# fixtures down (stopping the servers it started); SIGKILL if that itself hangs.
TEST_TIMEOUT_S ?= 1500
PYTEST_ARGS ?=

.PHONY: venv test lint run soak chaos bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,embedded]'
	touch $@

test: venv
	timeout --signal=INT --kill-after=60 $(TEST_TIMEOUT_S) $(BIN)/pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

run: venv
	$(BIN)/sidecar dev $(ARGS)

soak: venv
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

# 100+ random faults (Redis, Postgres, sidecar replicas, failover, a lying provider) under load, then the
# audit; about 5 minutes. Figures of the last run: docs/chaos.md.
chaos: venv
	timeout --signal=INT --kill-after=60 1500 $(BIN)/pytest -q -s -p no:logging -m chaos tests/test_chaos.py $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m bench
