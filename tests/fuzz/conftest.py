"""`make fuzz` (marker `fuzz`, deselected by default): writes the run's figures to FUZZ_REPORT."""

from __future__ import annotations

import os
import time

import pytest
from support.fuzz_report import TARGETS, markdown

_started = time.perf_counter()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.fuzz)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:
    path = os.environ.get("FUZZ_REPORT")
    # Only for a fuzz run (make fuzz, or -m fuzz): the smoke test in the normal suite fills TARGETS too.
    if not TARGETS or not (path or terminalreporter.config.getoption("markexpr") == "fuzz"):
        return
    failed = len(terminalreporter.stats.get("failed", [])) + len(terminalreporter.stats.get("error", []))
    passed = len(terminalreporter.stats.get("passed", []))
    outcome = f"{passed} targets passed, {failed} failed" if failed else f"all {passed} targets passed"
    report = markdown(outcome, time.perf_counter() - _started)
    terminalreporter.write_line("")
    terminalreporter.write(report)
    if path:
        with open(path, "w") as f:
            f.write(report)
