# The sidecar image: one image, every role (`sidecar serve | control | migrate`).
# Build it with the classic builder or BuildKit, from any base that has `python3` (>= 3.11, with its
# venv module) and `groupadd`/`useradd`: PYTHON_IMAGE is python:3.11-slim by default, or a local base
# made with debootstrap where no registry is reachable (docs/deploy.md gives the exact commands).
ARG PYTHON_IMAGE=python:3.11-slim

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
RUN if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; fi \
 && /opt/venv/bin/pip install "$@" . \
 && rm -rf /opt/venv/lib/python3*/site-packages/sidecar/devtools \
 && cd / \
 && ! /opt/venv/bin/python -c "import sidecar.devtools" 2>/dev/null \
 && /opt/venv/bin/python -c "import importlib, pkgutil, sidecar; [importlib.import_module(m.name) for m in pkgutil.walk_packages(sidecar.__path__, 'sidecar.')]" \
 && { /opt/venv/bin/sidecar dev 2>&1 | grep -q 'not available in this installation'; }

# Runtime: the same base (the venv's interpreter path must exist), the venv, the default config.
FROM ${PYTHON_IMAGE}
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
ENTRYPOINT ["sidecar"]
CMD ["serve", "--config", "/etc/sidecar/sidecar.yaml"]
