"""sidecar/proxy/budget.py: buffered answers share one byte budget; past it a read is refused at
once, and every byte comes back however a read ends (issue 8.10)."""

from __future__ import annotations

import pytest

from sidecar.proxy.budget import BudgetExceeded, ByteBudget


def test_reads_within_the_budget_are_granted_and_released():
    budget = ByteBudget(limit_bytes=100)
    with budget.reservation() as first, budget.reservation() as second:
        first.grow(60)
        second.grow(40)
        assert budget.in_use_bytes == 100
    assert budget.in_use_bytes == 0 and budget.peak_bytes == 100


def test_past_the_budget_a_read_is_refused_with_a_clear_error_and_keeps_nothing():
    budget = ByteBudget(limit_bytes=100)
    with budget.reservation() as held:
        held.grow(70)
        with pytest.raises(BudgetExceeded) as refused:
            budget.acquire(31)
        assert "31 more bytes" in str(refused.value) and "70 of 100 bytes" in str(refused.value)
        assert budget.in_use_bytes == 70 and budget.refusals == 1
        budget.acquire(30)  # exactly the limit is allowed
        budget.release(30)
    assert budget.in_use_bytes == 0


def test_a_read_that_fails_midway_releases_what_it_held():
    budget = ByteBudget(limit_bytes=1000)
    with pytest.raises(BudgetExceeded), budget.reservation() as held:
        for _ in range(20):
            held.grow(100)
    assert budget.in_use_bytes == 0
    with pytest.raises(RuntimeError), budget.reservation() as held:
        held.grow(500)
        raise RuntimeError("the upstream connection broke")
    assert budget.in_use_bytes == 0


def test_nonsense_amounts_are_refused():
    budget = ByteBudget(limit_bytes=10)
    with pytest.raises(ValueError):
        budget.acquire(-1)
    with pytest.raises(ValueError):
        budget.release(1)
    with pytest.raises(ValueError):
        ByteBudget(limit_bytes=0)
