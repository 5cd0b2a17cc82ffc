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

.PHONY: venv test lint run soak bench schema rules-check

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

bench: venv
	$(BIN)/python -m bench

# The Helm chart's values.schema.json, from the config's types (tests/test_config.py checks it is current).
schema: venv
	$(BIN)/sidecar schema > helm/ai-metering-sidecar/values.schema.json

# The alert rules: promtool's syntax check and its unit tests (tests/alerts/rules_test.yaml). promtool
# comes with Debian's `prometheus` package. With HELM=/path/to/helm, the PrometheusRule the chart
# renders is checked too. Not part of `make test`: CI machines need not have promtool.
PROMTOOL ?= promtool
HELM ?=
RULES := helm/ai-metering-sidecar/alerts/rules.yaml

rules-check: venv
	$(PROMTOOL) check rules $(RULES)
	$(PROMTOOL) test rules tests/alerts/rules_test.yaml
ifneq ($(HELM),)
	rendered=$$(mktemp --suffix=.yaml) && \
	$(HELM) template rules-check helm/ai-metering-sidecar --set metrics.prometheusRule.enabled=true \
		--show-only templates/prometheusrule.yaml \
		| $(BIN)/python -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(sys.stdin)["spec"], sys.stdout)' > $$rendered && \
	$(PROMTOOL) check rules $$rendered; status=$$?; rm -f $$rendered; exit $$status
endif
