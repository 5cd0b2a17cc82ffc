"""Layer 1 of `make fuzz`: the pure targets (tests/support/fuzz_pure.py), FUZZ_EXAMPLES inputs each."""

from __future__ import annotations

from support.fuzz_pure import TARGETS, make_test
from support.fuzz_report import PURE_EXAMPLES

for _name in TARGETS:
    globals()[f"test_fuzz_{_name}"] = make_test(_name, PURE_EXAMPLES)
