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

.PHONY: venv test lint run soak bench fuzz

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

# The fuzz targets of tests/fuzz/ (docs/fuzz.md): ~1.3 million inputs, ~15 minutes on 2 cores. The run's
# figures are written to docs/fuzz-last-run.md. Scale with FUZZ_EXAMPLES (generated inputs per pure
# target), FUZZ_MUTANTS (cheap variants of each), FUZZ_HTTP_EXAMPLES / FUZZ_HTTP_MUTANTS (data-plane
# calls) and FUZZ_ADMIN_EXAMPLES (admin calls).
FUZZ_EXAMPLES ?= 8000
FUZZ_MUTANTS ?= 30
FUZZ_HTTP_EXAMPLES ?= 4000
FUZZ_HTTP_MUTANTS ?= 3
FUZZ_ADMIN_EXAMPLES ?= 3000
FUZZ_REPORT ?= docs/fuzz-last-run.md

fuzz: venv
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_MUTANTS=$(FUZZ_MUTANTS) FUZZ_HTTP_EXAMPLES=$(FUZZ_HTTP_EXAMPLES) \
	FUZZ_HTTP_MUTANTS=$(FUZZ_HTTP_MUTANTS) FUZZ_ADMIN_EXAMPLES=$(FUZZ_ADMIN_EXAMPLES) FUZZ_REPORT=$(FUZZ_REPORT) \
	$(BIN)/pytest -q -p no:logging -m fuzz tests/fuzz $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m bench
