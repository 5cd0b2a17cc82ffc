"""A process-wide budget of bytes for buffered answers (issue 8.10).

Each buffered read reserves what it holds before it holds it; past the budget the read is refused
at once with BudgetExceeded (which the caller turns into a clear error), never queued: a call
waiting for memory would hold its client, its hold and its upstream connection meanwhile.

    with budget.reservation() as held:
        while chunk := await read():
            held.grow(len(chunk))   # raises BudgetExceeded, nothing kept past the budget
            parts.append(chunk)
    # everything reserved is released on leaving the block, however it is left

Single event loop, no awaits inside: no lock is needed.
"""

from __future__ import annotations

from sidecar.errors import DomainError

BUDGET_BYTES_DEFAULT = 256 * 1024 * 1024


class BudgetExceeded(DomainError):
    """Granting these bytes would take buffered answers past the process's budget."""

    def __init__(self, wanted_bytes: int, in_use_bytes: int, limit_bytes: int) -> None:
        super().__init__(
            f"buffering {wanted_bytes} more bytes would exceed the process's budget for buffered answers "
            f"({in_use_bytes} of {limit_bytes} bytes in use)"
        )
        self.wanted_bytes, self.in_use_bytes, self.limit_bytes = wanted_bytes, in_use_bytes, limit_bytes


class ByteBudget:
    __slots__ = ("in_use_bytes", "limit_bytes", "peak_bytes", "refusals")

    def __init__(self, limit_bytes: int = BUDGET_BYTES_DEFAULT) -> None:
        if limit_bytes < 1:
            raise ValueError("limit_bytes must be positive")
        self.limit_bytes = limit_bytes
        self.in_use_bytes = 0
        self.peak_bytes = 0  # for a gauge: how close the process came to the limit
        self.refusals = 0

    def acquire(self, n_bytes: int) -> None:
        if n_bytes < 0:
            raise ValueError("n_bytes must not be negative")
        if self.in_use_bytes + n_bytes > self.limit_bytes:
            self.refusals += 1
            raise BudgetExceeded(n_bytes, self.in_use_bytes, self.limit_bytes)
        self.in_use_bytes += n_bytes
        self.peak_bytes = max(self.peak_bytes, self.in_use_bytes)

    def release(self, n_bytes: int) -> None:
        if not 0 <= n_bytes <= self.in_use_bytes:
            raise ValueError(f"releasing {n_bytes} bytes, but only {self.in_use_bytes} are in use")
        self.in_use_bytes -= n_bytes

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """Bytes one buffered read holds; grows chunk by chunk, released whole (a context manager)."""

    __slots__ = ("_budget", "held_bytes")

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held_bytes = 0

    def grow(self, n_bytes: int) -> None:
        self._budget.acquire(n_bytes)
        self.held_bytes += n_bytes

    def release(self) -> None:
        held, self.held_bytes = self.held_bytes, 0
        self._budget.release(held)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
