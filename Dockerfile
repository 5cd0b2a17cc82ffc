# The sidecar image: one image, every role (`sidecar serve | control | migrate`).
# Build it with the classic builder or BuildKit, from any base that has `python3` (>= 3.11, with its
# venv module) and `groupadd`/`useradd`: PYTHON_IMAGE is python:3.11-slim by default, or a local base
# made with debootstrap where no registry is reachable (docs/deploy.md gives the exact commands).
#
# The default base is pinned by digest, so a rebuild gets the same bytes until someone moves the pin on
# purpose. This digest was taken from public Dockerfiles that pin the official library/python:3.11-slim
# (two independent ones, one through AWS's mirror of Docker's official images, agree on it); it could
# not be checked here, where no registry is reachable. A wrong or withdrawn digest fails the pull, it
# cannot pull something else. To move it to the current 3.11-slim (do so for security fixes):
#   docker pull python:3.11-slim && docker inspect --format '{{index .RepoDigests 0}}' python:3.11-slim
#   (or: docker buildx imagetools inspect python:3.11-slim, the "Digest:" line)
# and replace the sha256 below; Renovate and Dependabot can open that change for you.
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# Builder: install the package and its runtime dependencies (no dev/embedded extras) into a venv.
# Every runtime dependency ships manylinux wheels, so no compiler is needed.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# The wheelhouse (`make wheelhouse`): when it holds wheels, pip installs from it alone (--no-index), so
# the build needs no package index and a missing wheel fails the build instead of fetching something
# else; when it is empty, pip uses the index as usual.
COPY wheelhouse/ /wheels/
COPY pyproject.toml ./
COPY sidecar ./sidecar
# The development tools (sidecar/devtools: `sidecar dev`, the mock provider, embedded servers) are not
# part of the product: .dockerignore keeps them out of the build context, and should a build see them
# anyway they are deleted from the installed package. Then prove it: the package has no devtools, every
# product module imports without them, and `sidecar dev` says in one line that they are not here.
# The checks run from / so that they import the installed package, not the sources in /src.
# SIDECAR_EXTRAS: optional dependency groups of pyproject.toml; `tracing` (the OTLP exporter) lets
# config tracing.otlp_endpoint export traces. Empty: none.
ARG SIDECAR_EXTRAS=tracing
RUN if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; fi \
 && target=. && if [ -n "$SIDECAR_EXTRAS" ]; then target=".[$SIDECAR_EXTRAS]"; fi \
 && /opt/venv/bin/pip install "$@" "$target" \
 && rm -rf /opt/venv/lib/python3*/site-packages/sidecar/devtools \
 && cd / \
 && ! /opt/venv/bin/python -c "import sidecar.devtools" 2>/dev/null \
 && /opt/venv/bin/python -c "import importlib, pkgutil, sidecar; [importlib.import_module(m.name) for m in pkgutil.walk_packages(sidecar.__path__, 'sidecar.')]" \
 && { /opt/venv/bin/sidecar dev 2>&1 | grep -q 'not available in this installation'; }

# Runtime: the same base (the venv's interpreter path must exist), the venv, the default config.
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="ai-metering-sidecar" \
      org.opencontainers.image.description="Metering sidecar for AI agents: credits, holds, an immutable ledger" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml
RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin sidecar
COPY --from=builder /opt/venv /opt/venv
# Defaults only: on Kubernetes the chart mounts its ConfigMap over /etc/sidecar.
COPY config/ /etc/sidecar/
# In a container the sidecar must listen beyond loopback.
RUN sed -i 's/^  host: 127.0.0.1/  host: 0.0.0.0/' /etc/sidecar/sidecar.yaml \
 && grep -q '^  host: 0.0.0.0' /etc/sidecar/sidecar.yaml
# The settlement spool (holds.spool_dir): it must be writable by the user the sidecar runs as. On
# Kubernetes the chart mounts a volume here; with plain Docker mount one to keep spooled settlements.
RUN mkdir -p /var/lib/sidecar/spool \
 && chown -R 10001:10001 /var/lib/sidecar \
 && chmod 0750 /var/lib/sidecar /var/lib/sidecar/spool
# Numeric, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
# 8080: data plane (serve) or admin API (control); 9090: ops (/healthz /readyz /metrics).
EXPOSE 8080 9090
# The ops port's liveness answer, with the image's own Python (the image has no curl). Meaningful for
# the long-running roles (serve, control); set SIDECAR_HEALTHCHECK_URL when ops_port is not 9090.
# Kubernetes ignores HEALTHCHECK: the chart has its own probes.
ENV SIDECAR_HEALTHCHECK_URL=http://127.0.0.1:9090/healthz
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SIDECAR_HEALTHCHECK_URL'], timeout=2)"]
ENTRYPOINT ["sidecar"]
# One serving process per CPU the container may use (its cgroup quota; --workers N for another count):
# they share the port, and one more process runs the ledger flusher and the hold sweeper.
CMD ["serve", "--config", "/etc/sidecar/sidecar.yaml", "--workers", "0"]
