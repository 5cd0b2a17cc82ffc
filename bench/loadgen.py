"""The load generator: a lean HTTP/1.1 keep-alive client on uvloop, run as its own process.

`python -m bench.loadgen '<json spec>'` prints JSON lines on stdout: `{"event": "window_start"}` and
`{"event": "window_end"}` around the measured window (so the caller can read every process's CPU over
exactly that window), `{"event": "all_open"}` when a hold run has every stream open, then one
`{"event": "result", ...}`.

Why not aiohttp's client: on a 2-core machine the generator shares the CPU with the servers it
measures, and aiohttp's client costs about as much per request as the server under test. This one is
callback-driven (no coroutine per request), parses only what it needs (status, Content-Length or
chunked framing, SSE event boundaries) and reports its own CPU use so a reader can check it was not
the bottleneck.

Modes:
- closed: `concurrency` connections, each sending its next request as soon as the last one answered;
  counts the completions inside the window (maximum sustained throughput).
- open: a constant arrival rate (`rate` per second), each request on a free connection (a new one is
  opened when none is free, up to `max_conns`), latency measured from the moment it was written.
- stream: `concurrency` connections looping streamed requests; per stream, time to the first SSE event
  and the gaps between consecutive events.
- hold: `streams` streamed requests opened at once (ramped over `ramp_s`), each once; reports how many
  were open at the same time.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import sys
import time
from typing import Any

import orjson

IDLE, HEAD, BODY_CL, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILER = range(7)
CONNECT_BATCH = 100  # connections opened at once: stays under a listener's accept backlog
DRAIN_TIMEOUT_S = 10.0  # after the window: how long in-flight requests may take to finish


def build_request(spec: dict[str, Any]) -> bytes:
    body = spec["body"].encode() if isinstance(spec["body"], str) else orjson.dumps(spec["body"])
    lines = [
        f"POST {spec['path']} HTTP/1.1",
        f"Host: {spec['host']}:{spec['port']}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{name}: {value}" for name, value in (spec.get("headers") or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time. Calls `driver.on_done(conn, now)` per response."""

    def __init__(self, driver: Any, stream: bool) -> None:
        self.driver = driver
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.state = IDLE
        self.buf = b""
        self.status = 0
        self.keepalive = True
        self.remaining = 0
        self.chunk_left = 0
        self.sent_at = 0.0
        self.intended_at = 0.0
        self.head_at = 0.0
        self.events: list[float] = []
        self._last_nl = False
        self.closed = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.state != IDLE:
            self.state = IDLE
            self.status = 0  # counted as an error
            self.driver.on_done(self, time.perf_counter())

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.state == HEAD:
            buf = self.buf + data if self.buf else data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.buf = b""
            self.head_at = now
            self.status = int(buf[9:12])
            head = buf[:end].lower()
            self.keepalive = b"\r\nconnection: close" not in head
            data = buf[end + 4 :]
            if self.stream:
                self.driver.on_head(self, now)
            if b"\r\ntransfer-encoding: chunked" in head:
                self.state = CHUNK_SIZE
            else:
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    self.keepalive = False  # body runs to the close: not expected from these servers
                    self.remaining = 1 << 62
                else:
                    line_end = head.find(b"\r\n", at + 2)
                    self.remaining = int(head[at + 17 : line_end if line_end > 0 else len(head)])
                self.state = BODY_CL
                if self.remaining == 0:
                    self._done(now)
                    return
            if not data:
                return
        if self.state == BODY_CL:
            self.remaining -= len(data)
            if self.stream:
                self._scan(data, now)
            if self.remaining <= 0:
                self._done(now)
            return
        if self.state != IDLE:
            self._chunked(data, now)

    # -- parsing
    def _chunked(self, data: bytes, now: float) -> None:
        buf = self.buf + data if self.buf else data
        self.buf = b""
        pos, size = 0, len(buf)
        while pos < size:
            state = self.state
            if state == CHUNK_DATA:
                take = min(self.chunk_left, size - pos)
                if self.stream:
                    self._scan(buf[pos : pos + take], now)
                pos += take
                self.chunk_left -= take
                if self.chunk_left:
                    return
                self.state = CHUNK_CRLF
            elif state == CHUNK_CRLF:
                if size - pos < 2:
                    self.buf = buf[pos:]
                    return
                pos += 2
                self.state = CHUNK_SIZE
            elif state == CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    self.buf = buf[pos:]
                    return
                chunk = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if chunk:
                    self.chunk_left, self.state = chunk, CHUNK_DATA
                else:
                    self.state = TRAILER
            elif state == TRAILER:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    self.buf = buf[pos:]
                    return
                if eol == pos:
                    self._done(now)
                    return
                pos = eol + 2
            else:
                return

    def _scan(self, payload: bytes, now: float) -> None:
        """SSE event boundaries (a blank line) in the body: one timestamp per event."""
        if not payload:
            return
        count = payload.count(b"\n\n")
        if self._last_nl and payload[0] == 0x0A:
            count += 1
        self._last_nl = payload[-1] == 0x0A and not payload.endswith(b"\n\n")
        if count:
            self.events.extend([now] * count)

    def _done(self, now: float) -> None:
        self.state = IDLE
        self.buf = b""
        self.driver.on_done(self, now)

    # -- requests
    def send(self, request: bytes, intended_at: float = 0.0) -> None:
        self.state = HEAD
        self.buf = b""
        self.status = 0
        self.events = []
        self._last_nl = False
        self.sent_at = time.perf_counter()
        self.intended_at = intended_at or self.sent_at
        self.transport.write(request)


def emit(event: str, **fields: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps({"event": event, "t": time.monotonic(), **fields}) + b"\n")
    sys.stdout.flush()


async def open_conns(driver: Any, spec: dict[str, Any], count: int, stream: bool) -> list[Conn]:
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    while len(conns) < count:
        batch = min(CONNECT_BATCH, count - len(conns))
        made = await asyncio.gather(
            *(loop.create_connection(lambda: Conn(driver, stream), spec["host"], spec["port"]) for _ in range(batch))
        )
        conns.extend(protocol for _, protocol in made)
    return conns


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


class Driver:
    """Shared bookkeeping: the window, status counts, completion of the run."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.request = build_request(spec)
        self.statuses: collections.Counter[int] = collections.Counter()
        self.inflight = 0
        self.window_start = math.inf
        self.window_end = math.inf
        self.stopping = False
        self.finished = asyncio.get_running_loop().create_future()
        self.cpu_at_start = 0.0
        self.cpu_in_window = 0.0

    def start_window(self, warmup_s: float, duration_s: float) -> None:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        self.window_start = now + warmup_s
        self.window_end = self.window_start + duration_s
        loop.call_later(warmup_s, self._on_window_start)
        loop.call_later(warmup_s + duration_s, self._on_window_end)

    def _on_window_start(self) -> None:
        self.cpu_at_start = time.process_time()
        emit("window_start")

    def _on_window_end(self) -> None:
        self.cpu_in_window = time.process_time() - self.cpu_at_start
        self.stopping = True
        emit("window_end")
        self._check_finished()

    def _check_finished(self) -> None:
        if self.stopping and self.inflight == 0 and not self.finished.done():
            self.finished.set_result(None)

    async def wait(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.finished), self.spec.get("duration_s", 0) + 60)
        except TimeoutError:
            pass
        if not self.stopping:
            self._on_window_end()
        try:
            await asyncio.wait_for(asyncio.shield(self.finished), DRAIN_TIMEOUT_S)
        except TimeoutError:
            pass

    def base_result(self) -> dict[str, Any]:
        return {
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "unfinished": self.inflight,
            "window_s": self.window_end - self.window_start,
            "gen_cpu_s": self.cpu_in_window,
        }


class ClosedLoop(Driver):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.latencies: list[int] = []
        self.completed = 0

    async def run(self) -> dict[str, Any]:
        conns = await open_conns(self, self.spec, self.spec["concurrency"], stream=False)
        self.start_window(self.spec["warmup_s"], self.spec["duration_s"])
        for conn in conns:
            self.inflight += 1
            conn.send(self.request)
        await self.wait()
        return {**self.base_result(), "completed": self.completed, "latency_us": self.latencies}

    def on_done(self, conn: Conn, now: float) -> None:
        if self.window_start <= now <= self.window_end:
            self.completed += 1
            self.statuses[conn.status] += 1
            self.latencies.append(_us(now - conn.sent_at))
        if not self.stopping and not conn.closed and conn.keepalive:
            conn.send(self.request)
        else:
            self.inflight -= 1
            if not conn.closed:
                conn.transport.close()
            self._check_finished()


class OpenLoop(Driver):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.idle: list[Conn] = []
        self.queued: collections.deque[float] = collections.deque()
        self.latencies: list[int] = []
        self.latencies_intended: list[int] = []
        self.conns = 0
        self.sent_in_window = 0
        self.queued_total = 0

    async def run(self) -> dict[str, Any]:
        spec = self.spec
        rate, max_conns = spec["rate"], spec.get("max_conns", 1024)
        initial = min(max_conns, spec.get("initial_conns", 64))
        self.idle = await open_conns(self, spec, initial, stream=False)
        self.conns = initial
        self.start_window(spec["warmup_s"], spec["duration_s"])
        started = time.perf_counter()
        sent = 0
        while not self.stopping:
            due = int((time.perf_counter() - started) * rate) + 1
            while sent < due:
                intended = started + sent / rate
                sent += 1
                if self.window_start <= intended <= self.window_end:
                    self.sent_in_window += 1
                self.inflight += 1
                if self.idle:
                    self.idle.pop().send(self.request, intended)
                elif self.conns < max_conns:
                    self.conns += 1
                    asyncio.get_running_loop().create_task(self._connect_and_send(intended))
                else:
                    self.queued.append(intended)
                    self.queued_total += 1
            await asyncio.sleep(0.001)  # uvloop's timers tick in milliseconds
        await self.wait()
        return {
            **self.base_result(),
            "rate": rate,
            "sent_in_window": self.sent_in_window,
            "completed": len(self.latencies),
            "conns": self.conns,
            "queued_total": self.queued_total,
            "latency_us": self.latencies,
            "latency_intended_us": self.latencies_intended,
        }

    async def _connect_and_send(self, intended: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: Conn(self, stream=False), self.spec["host"], self.spec["port"]
            )
        except OSError:
            self.conns -= 1
            self.inflight -= 1
            self.statuses[0] += 1
            self._check_finished()
            return
        conn.send(self.request, intended)

    def on_done(self, conn: Conn, now: float) -> None:
        self.inflight -= 1
        if self.window_start <= conn.intended_at <= self.window_end:
            self.statuses[conn.status] += 1
            self.latencies.append(_us(now - conn.sent_at))
            self.latencies_intended.append(_us(now - conn.intended_at))
        if conn.closed or not conn.keepalive:
            self.conns -= 1
            if not conn.closed:
                conn.transport.close()
        elif self.queued:  # a request that found no free connection when it was due
            conn.send(self.request, self.queued.popleft())
        else:
            self.idle.append(conn)
        self._check_finished()


class StreamLoop(Driver):
    """Closed loop of streamed calls; per stream: time to first event and the gaps between events."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.ttfb: list[int] = []
        self.head: list[int] = []
        self.gaps: list[int] = []
        self.totals: list[int] = []  # from the request to the stream's last event
        self.events_per_stream: collections.Counter[int] = collections.Counter()
        self.streams = 0
        self.gap_events = spec.get("gap_events", 64)

    async def run(self) -> dict[str, Any]:
        conns = await open_conns(self, self.spec, self.spec["concurrency"], stream=True)
        self.start_window(self.spec["warmup_s"], self.spec["duration_s"])
        # Streams of equal length started together would stay in lock-step, and every round would be a
        # burst of `concurrency` new calls at once: spread the first ones over one stream's length.
        stagger_s = self.spec.get("stagger_s", 0.0)
        loop = asyncio.get_running_loop()
        for index, conn in enumerate(conns):
            self.inflight += 1
            loop.call_later(stagger_s * index / len(conns), conn.send, self.request)
        await self.wait()
        return self.stream_result()

    def record(self, conn: Conn) -> None:
        self.streams += 1
        self.statuses[conn.status] += 1
        events = conn.events
        self.events_per_stream[len(events)] += 1
        self.head.append(_us(conn.head_at - conn.sent_at))
        if events:
            self.ttfb.append(_us(events[0] - conn.sent_at))
            self.totals.append(_us(events[-1] - conn.sent_at))
            # Gaps before each content event: events[0] is the role chunk, 1..N the content chunks.
            last = min(len(events), self.gap_events + 1)
            self.gaps.extend(_us(events[i] - events[i - 1]) for i in range(1, last))

    def on_head(self, conn: Conn, now: float) -> None:
        pass

    def on_done(self, conn: Conn, now: float) -> None:
        if self.window_start <= conn.sent_at <= self.window_end:
            self.record(conn)
        if not self.stopping and not conn.closed and conn.keepalive:
            conn.send(self.request)
        else:
            self.inflight -= 1
            if not conn.closed:
                conn.transport.close()
            self._check_finished()

    def stream_result(self) -> dict[str, Any]:
        return {
            **self.base_result(),
            "streams": self.streams,
            "events_per_stream": {str(k): v for k, v in self.events_per_stream.items()},
            "ttfb_us": self.ttfb,
            "head_us": self.head,
            "gap_us": self.gaps,
            "total_us": self.totals,
        }


class StreamHold(StreamLoop):
    """`streams` streamed calls open at the same time, each sent once (ramped over `ramp_s`)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.active = 0
        self.max_active = 0
        self.target = spec["streams"]
        self.all_open_at: float | None = None
        self.first_close_at: float | None = None

    async def run(self) -> dict[str, Any]:
        spec = self.spec
        conns = await open_conns(self, spec, self.target, stream=True)
        emit("connected", conns=len(conns))
        self.window_start = time.perf_counter()
        self.cpu_at_start = time.process_time()
        emit("window_start")
        ramp_s = spec.get("ramp_s", 1.0)
        per_ms = max(1, math.ceil(len(conns) / max(ramp_s * 1000, 1)))
        for index, conn in enumerate(conns):
            self.inflight += 1
            conn.send(self.request)
            if index % per_ms == per_ms - 1:
                await asyncio.sleep(0.001)
        self.stopping = True  # nothing is re-sent: the run ends when every stream has ended
        try:
            await asyncio.wait_for(asyncio.shield(self.finished), spec.get("timeout_s", 60))
        except TimeoutError:
            pass
        self.window_end = time.perf_counter()
        self.cpu_in_window = time.process_time() - self.cpu_at_start
        emit("window_end")
        return {
            **self.stream_result(),
            "target": self.target,
            "max_active": self.max_active,
            "all_open_s": (
                (self.first_close_at or self.window_end) - self.all_open_at if self.all_open_at is not None else 0.0
            ),
        }

    def on_head(self, conn: Conn, now: float) -> None:
        self.active += 1
        if self.active > self.max_active:
            self.max_active = self.active
            if self.active == self.target and self.all_open_at is None:
                self.all_open_at = now
                emit("all_open", active=self.active)

    def on_done(self, conn: Conn, now: float) -> None:
        if conn.head_at >= conn.sent_at:
            self.active -= 1
            if self.first_close_at is None:
                self.first_close_at = now
        self.record(conn)
        self.inflight -= 1
        if not conn.closed:
            conn.transport.close()
        self._check_finished()


MODES = {"closed": ClosedLoop, "open": OpenLoop, "stream": StreamLoop, "hold": StreamHold}


async def amain(spec: dict[str, Any]) -> dict[str, Any]:
    driver = MODES[spec["mode"]](spec)
    return await driver.run()


def main(argv: list[str]) -> int:
    # Blocking writes: a result line is larger than a pipe's buffer, and a busy reader must not turn
    # it into a partial write (a non-blocking stdout inherited from the harness's event loop would).
    os.set_blocking(sys.stdout.fileno(), True)
    spec = orjson.loads(argv[0])
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(amain(spec))
    emit("result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
