"""The development tools stay apart from the product, and their one process supervisor keeps no orphan."""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.processes import write_config

from sidecar.devtools import supervisor

PACKAGE = Path(__file__).resolve().parents[1] / "sidecar"
DEVTOOLS = "sidecar.devtools"
# The only place outside the sub-package that may name it: cli.py's dispatch of `dev` and `mock-provider`.
DISPATCH = ("cli.py", "_devtool")

# Runs the CLI in an interpreter where sidecar.devtools cannot be imported, as in the production image
# (which deletes the directory): any import of it, however indirect, fails loudly.
WITHOUT_DEVTOOLS = f"""
import sys

class NoDevtools:
    def find_spec(self, name, path=None, target=None):
        if name == {DEVTOOLS!r} or name.startswith({DEVTOOLS!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NoDevtools())
import pkgutil, importlib, sidecar
if sys.argv[1] == "--import-all":
    for module in pkgutil.walk_packages(sidecar.__path__, "sidecar."):
        if not module.name.startswith({DEVTOOLS!r}):
            importlib.import_module(module.name)
    print("imported", len(sys.modules))
    sys.exit(0)
from sidecar.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _without_devtools(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_DEVTOOLS, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PACKAGE.parent,
    )


# ---------------------------------------------------------------------------------------------------------
# The product does not need the development tools


def _devtools_imports(path: Path) -> list[tuple[int, str]]:
    """(line, enclosing function) of every import of sidecar.devtools in a module, however spelled."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.ImportFrom) and child.module:
                targets = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
            elif isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                targets = [child.value]  # importlib.import_module("sidecar.devtools...")
            else:
                targets = []
            if any(t == DEVTOOLS or t.startswith(DEVTOOLS + ".") for t in targets):
                found.append((child.lineno, function))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_no_product_module_imports_the_devtools() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "devtools":
            continue
        for line, function in _devtools_imports(path):
            if (str(relative), function) != DISPATCH:
                offenders.append(f"sidecar/{relative}:{line} (in {function})")
    assert not offenders, "product modules importing sidecar.devtools: " + ", ".join(offenders)
    assert _devtools_imports(PACKAGE / DISPATCH[0]), "the boundary check no longer sees cli.py's dispatch"


def test_every_product_module_imports_without_the_devtools() -> None:
    result = _without_devtools("--import-all")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported")


def test_migrate_runs_without_the_devtools(tmp_path: Path, redis_url: str, migrated_database_url: str) -> None:
    config = write_config(tmp_path, redis_url, migrated_database_url, "http://127.0.0.1:9/v1", 0, 0)
    result = _without_devtools("migrate", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "migrations applied: none (up to date)" in result.stdout


@pytest.mark.parametrize("command", ["dev", "mock-provider"])
def test_dev_commands_say_in_one_line_that_the_tools_are_not_installed(command: str) -> None:
    result = _without_devtools(command)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sidecar {command}: not available in this installation")
    assert DEVTOOLS in lines[0]


# ---------------------------------------------------------------------------------------------------------
# The one process supervisor


def _python(tmp_path: Path, name: str, code: str) -> supervisor.Child:
    return supervisor.spawn(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", cwd=tmp_path)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


# Starts a grandchild in the same session, prints both pids, then ignores SIGTERM (as a hung server would).
STUBBORN = """
import signal, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("pids", grandchild.pid, flush=True)
time.sleep(120)
"""


def test_stop_escalates_to_sigkill_and_takes_the_session_with_it(tmp_path: Path) -> None:
    child = _python(tmp_path, "stubborn", STUBBORN)
    match = supervisor.wait_ready(child, supervisor.log_match(child, r"pids (\d+)"), timeout_s=20)
    grandchild = int(match.group(1))

    started = time.monotonic()
    code = child.stop(timeout_s=0.5)

    assert code == -signal.SIGKILL  # it ignored SIGTERM
    assert 0.5 <= time.monotonic() - started < 10
    assert _wait_dead(grandchild), "the grandchild outlived the stop"


def test_stop_is_graceful_when_the_child_obeys(tmp_path: Path) -> None:
    child = _python(tmp_path, "obedient", "import time; print('up', flush=True); time.sleep(120)")
    supervisor.wait_ready(child, supervisor.log_match(child, "up"), timeout_s=20)
    assert child.stop(timeout_s=10) == -signal.SIGTERM
    assert child.stop() == -signal.SIGTERM  # twice is harmless


def test_a_child_that_dies_during_start_is_reported_with_its_log(tmp_path: Path) -> None:
    child = _python(tmp_path, "crasher", "import sys; print('bad config: port'); sys.exit(3)")
    with pytest.raises(supervisor.StartError, match=r"(?s)crasher exited during start \(3\).*bad config: port"):
        supervisor.wait_ready(child, lambda: False, timeout_s=20)


def test_a_child_that_never_answers_is_killed(tmp_path: Path) -> None:
    child = _python(tmp_path, "silent", STUBBORN)
    supervisor.wait_ready(child, supervisor.log_match(child, r"pids (\d+)"), timeout_s=20)
    grandchild = int(supervisor.log_match(child, r"pids (\d+)")().group(1))  # type: ignore[union-attr]

    with pytest.raises(supervisor.StartError, match=r"silent did not answer within 0\.3 s"):
        supervisor.wait_ready(child, lambda: False, timeout_s=0.3)

    assert child.returncode == -signal.SIGKILL
    assert _wait_dead(grandchild)


async def test_async_wait_and_stop_do_not_block_the_loop(tmp_path: Path) -> None:
    child = _python(tmp_path, "async", "import time; print('up', flush=True); time.sleep(120)")
    await supervisor.wait_log_match(child, "up", timeout_s=20)
    assert await child.wait_exit(0.1) is None
    assert await child.stop_async(timeout_s=10) == -signal.SIGTERM
