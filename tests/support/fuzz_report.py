"""Counts of the inputs each fuzz target ran, and the report `make fuzz` writes from them."""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field

# The number of examples each target runs, from the environment: `make fuzz` sets them, the smoke
# test in the normal suite passes its own small numbers.
PURE_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
HTTP_EXAMPLES = int(os.environ.get("FUZZ_HTTP_EXAMPLES", "500"))
ADMIN_EXAMPLES = int(os.environ.get("FUZZ_ADMIN_EXAMPLES", "200"))
HTTP_MUTANTS = int(os.environ.get("FUZZ_HTTP_MUTANTS", "3"))  # variants sent after each generated call
MUTANTS = int(os.environ.get("FUZZ_MUTANTS", "10"))  # cheap variants run after each generated input


@dataclass
class Target:
    inputs: int = 0  # inputs whose every property was checked: generated ones and their mutants
    generated: int = 0  # inputs hypothesis generated (the rest are mutants of them)
    calls: int = 0  # functions or HTTP requests the examples drove (one input may drive several)
    seconds: float = 0.0
    notes: Counter = field(default_factory=Counter)  # what the inputs led to (statuses, outcomes)


TARGETS: dict[str, Target] = {}


def target(name: str) -> Target:
    return TARGETS.setdefault(name, Target())


class timed:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Target:
        self._start = time.perf_counter()
        return target(self.name)

    def __exit__(self, *exc) -> None:
        target(self.name).seconds += time.perf_counter() - self._start


def machine() -> str:
    cpus = os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        model = "?"
    return f"{cpus} cores ({model}), {platform.system()} {platform.release()}, Python {platform.python_version()}"


def markdown(outcome: str, wall_s: float) -> str:
    lines = [
        "# Last `make fuzz` run",
        "",
        "Written by `make fuzz` (tests/fuzz/conftest.py) at the end of its run; see docs/fuzz.md for what",
        "each target checks.",
        "",
        f"- finished: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- outcome: {outcome}",
        f"- wall time: {wall_s:.0f} s",
        f"- machine: {machine()}",
        f"- settings: FUZZ_EXAMPLES={PURE_EXAMPLES} FUZZ_MUTANTS={MUTANTS} FUZZ_HTTP_EXAMPLES={HTTP_EXAMPLES} "
        f"FUZZ_HTTP_MUTANTS={HTTP_MUTANTS} FUZZ_ADMIN_EXAMPLES={ADMIN_EXAMPLES}",
        "",
        "| target | generated | inputs (with mutants) | calls driven | seconds | inputs/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, t in sorted(TARGETS.items()):
        if not (t.inputs or t.seconds):
            continue
        rate = t.inputs / t.seconds if t.seconds else 0
        lines.append(f"| {name} | {t.generated:,} | {t.inputs:,} | {t.calls:,} | {t.seconds:.0f} | {rate:,.0f} |")
    generated = sum(t.generated for t in TARGETS.values())
    total = sum(t.inputs for t in TARGETS.values())
    calls = sum(t.calls for t in TARGETS.values())
    lines.append(f"| **total** | **{generated:,}** | **{total:,}** | **{calls:,}** | | |")
    for name, t in sorted(TARGETS.items()):
        if t.notes:
            lines += ["", f"`{name}` outcomes: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(t.notes.items()))]
    return "\n".join(lines) + "\n"
