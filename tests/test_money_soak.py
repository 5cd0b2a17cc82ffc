"""The money-in soak (issue 9): webhooks at their worst, auto-reloads (one card declined), expiries,
refunds, manual orders, key budgets, a post-charge workspace and a usage fee with a waiver, with the
provider faults of tests/test_soak.py and Redis emptied halfway; then every credit entered exactly once,
the identity exact in Redis and Postgres, `sidecar audit` clean (tests/support/money_soak.py).

`make soak` runs the long one; the short one runs in `make test`."""

from __future__ import annotations

import random

import pytest
import pytest_asyncio
from support import money_soak
from support.payments import start_shop, stop_shop


@pytest_asyncio.fixture
async def money_shop(redis_client, redis_url: str, migrated_database_url: str):
    instance = await start_shop(redis_url, migrated_database_url, **money_soak.SHOP_CONFIG)
    try:
        yield instance
    finally:
        await stop_shop(instance)


async def _soak(shop, redis_client, duration_s: float, workers: int, seed: int) -> dict:
    soak = money_soak.Soak(shop, redis_client, duration_s, workers, random.Random(seed))
    await money_soak.run(soak)
    return soak


async def test_money_in_short_soak(money_shop, redis_client) -> None:
    soak = await _soak(money_shop, redis_client, duration_s=4.0, workers=8, seed=20261201)
    figures = await money_soak.check(soak)
    assert sum(soak.truth.calls.values()) > 40, figures


@pytest.mark.slow
async def test_money_in_soak(money_shop, redis_client) -> None:
    soak = await _soak(money_shop, redis_client, duration_s=50.0, workers=24, seed=20261202)
    figures = await money_soak.check(soak, reloads_min=2)
    assert sum(soak.truth.calls.values()) > 1_000, figures
    print(figures)
