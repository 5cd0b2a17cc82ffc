"""Layer 2 of `make fuzz`: every route of a running sidecar over HTTP, against a hostile provider
(tests/support/fuzz_http.py). FUZZ_HTTP_EXAMPLES data-plane calls, FUZZ_ADMIN_EXAMPLES admin calls,
then the checks at rest. The tests share one sidecar and run in file order."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from support.fuzz_http import Fuzzed, run_admin, run_data_plane, run_final_checks
from support.fuzz_report import ADMIN_EXAMPLES, HTTP_EXAMPLES, HTTP_MUTANTS


@pytest.fixture(scope="module")
def fuzzed(redis_url: str, migrated_database_url: str) -> Iterator[Fuzzed]:
    redis.Redis.from_url(redis_url).flushdb()
    fz = Fuzzed(redis_url, migrated_database_url)
    try:
        yield fz
    finally:
        fz.close()


def test_fuzz_http_data_plane(fuzzed: Fuzzed) -> None:
    run_data_plane(fuzzed, HTTP_EXAMPLES, HTTP_MUTANTS)


def test_fuzz_http_admin(fuzzed: Fuzzed) -> None:
    run_admin(fuzzed, ADMIN_EXAMPLES)


def test_fuzz_http_final_checks(fuzzed: Fuzzed) -> None:
    run_final_checks(fuzzed)
