"""The hot path's own Redis transport: one pipelined connection, hiredis's reader, nothing else.

Every metered call makes two script calls (admit, settle). Through redis-py each costs about 90 us
of CPU in the client alone (pool checkout, connection health checks, the command packer, the
retry wrapper, a future per layer). Here a script call is: pack one command (hiredis, in C), append
it to a buffer, and wait for a future; every command issued during one turn of the event loop goes
out in one write, and every reply that arrived in one read is parsed in one go and handed to its
caller in order (Redis answers a connection's commands in the order it received them).

What redis-py's pool gave and this keeps:
- a broken connection fails every call waiting on it with redis' ConnectionError, and the next call
  connects again; a call is sent again (up to RETRIES times) when its connection broke, which is
  safe because every script is idempotent for its call (see state/lua/*.lua);
- no reply within `reply_timeout_s` closes the connection (every waiting call gets TimeoutError);
- NOSCRIPT (Redis restarted empty) loads the script and runs it again;
- READONLY (the server was demoted to a replica in a failover) fails that call and the next one connects
  anew, to whatever the address names now.
It speaks to one Redis server (plain TCP or a unix socket, AUTH and SELECT as the URL says); TLS and
Redis Cluster keep redis-py (see state/transport.py, where the choice is made).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass

import hiredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

PENDING_MAX = 65_536  # replies awaited on the connection at once; past it a call fails at once
RETRIES = 2  # resends of a call whose connection broke (scripts are idempotent per call)
RETRY_BACKOFF_S = (0.01, 0.05)
READER_BUFFER_BYTES = 1 << 16


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""  # a unix socket instead of host:port
    db: int = 0
    username: str | None = None
    password: str | None = None
    connect_timeout_s: float = 2.0
    reply_timeout_s: float = 5.0


class _Link(asyncio.Protocol):
    """One connection: replies matched to waiting futures in order."""

    def __init__(self, reply_timeout_s: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError, protocolError=RedisConnectionError)
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.sent_at: collections.deque[float] = collections.deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.broken: Exception | None = None  # set: takes no more calls (the next call connects anew)
        self.dead = False  # the transport is gone: nothing more is written or read
        self.reply_timeout_s = reply_timeout_s
        self._watchdog: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting, sent_at = self.waiting, self.sent_at
        try:
            while (reply := self.reader.gets()) is not False:
                sent_at.popleft()
                future = waiting.popleft()
                if future.done():  # its caller was cancelled: the reply is dropped, the order kept
                    continue
                if isinstance(reply, ResponseError):
                    error = _typed(reply)
                    future.set_exception(error)
                    if isinstance(error, ReadOnlyError):  # a demoted primary: the next call connects anew
                        self.broken = self.broken or RedisConnectionError("Redis is a read-only replica now")
                else:
                    future.set_result(reply)
        except RedisConnectionError as exc:  # a protocol error: nothing after it can be trusted
            self.fail(exc)
        except IndexError:  # a reply nobody asked for
            self.fail(RedisConnectionError("Redis sent a reply no command asked for"))
        if self.broken is not None and not self.waiting and not self.dead:  # retired, and every reply is in
            self.dead = True
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    # -- sending --------------------------------------------------------------------------------------

    def send(self, packed: bytes) -> asyncio.Future:
        if self.broken is not None:
            raise self.broken
        if len(self.waiting) >= PENDING_MAX:
            raise RedisConnectionError(f"more than {PENDING_MAX} Redis replies awaited at once")
        future = self.loop.create_future()
        self.waiting.append(future)
        self.sent_at.append(self.loop.time())
        self.out.append(packed)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self.reply_timeout_s, self._check_overdue)
        return future

    def _flush(self) -> None:
        """Everything asked during the last turn of the loop, in one write."""
        self.flush_scheduled = False
        if self.out and not self.dead:
            data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
            self.out.clear()
            self.transport.write(data)

    def _check_overdue(self) -> None:
        self._watchdog = None
        if not self.sent_at or self.dead:
            return
        overdue_at = self.sent_at[0] + self.reply_timeout_s
        if self.loop.time() >= overdue_at:
            self.fail(RedisTimeoutError(f"no reply from Redis within {self.reply_timeout_s:g} s"))
        else:
            self._watchdog = self.loop.call_at(overdue_at, self._check_overdue)

    def fail(self, exc: Exception) -> None:
        """The connection is done for: every waiting call gets `exc`; the next call connects anew."""
        if self.broken is None:
            self.broken = exc
        self.dead = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        self.sent_at.clear()
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()


def _typed(error: ResponseError) -> ResponseError:
    """redis-py's class for the replies callers tell apart."""
    text = str(error)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    if text.startswith("READONLY"):
        return ReadOnlyError(text)
    return error


class LeanScripts:
    """Runs scripts by EVALSHA on one multiplexed connection; `run` is the ScriptBatcher's interface."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._link: _Link | None = None
        self._connecting: asyncio.Future | None = None
        self._closed = False

    async def run(self, script: AsyncScript, keys: Sequence, args: Sequence):
        packed = hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
        for attempt in range(RETRIES + 1):
            try:
                try:
                    return await self._send(packed)
                except NoScriptError:  # Redis restarted empty: load it once, then again
                    script.sha = await self._send(hiredis.pack_command(("SCRIPT", "LOAD", script.script)))
                    if isinstance(script.sha, bytes):
                        script.sha = script.sha.decode()
                    packed = hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
                    return await self._send(packed)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if attempt == RETRIES or self._closed:
                    raise
                await asyncio.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
        raise AssertionError("unreachable")

    async def _send(self, packed: bytes):
        link = self._link
        if link is None or link.broken is not None:
            link = await self._connect()
        return await link.send(packed)

    async def _connect(self) -> _Link:
        """One connection attempt shared by every caller that needs it meanwhile."""
        if self._closed:
            raise RedisConnectionError("the Redis transport is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, done: asyncio.Future) -> None:
        self._connecting = None
        if not done.cancelled() and done.exception() is None:
            self._link = done.result()
            if self._closed:  # closed while connecting
                self._link.fail(RedisConnectionError("the Redis transport is closed"))

    async def _open(self) -> _Link:
        e = self.endpoint
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(e.connect_timeout_s):
                if e.path:
                    _, link = await loop.create_unix_connection(lambda: _Link(e.reply_timeout_s), e.path)
                else:
                    _, link = await loop.create_connection(lambda: _Link(e.reply_timeout_s), e.host, e.port)
                hello = []
                if e.password is not None:
                    auth = ("AUTH", e.username, e.password) if e.username else ("AUTH", e.password)
                    hello.append(link.send(hiredis.pack_command(auth)))
                if e.db:
                    hello.append(link.send(hiredis.pack_command(("SELECT", e.db))))
                if hello:
                    try:
                        await asyncio.gather(*hello)
                    except BaseException:  # refused (a wrong password, no such db): not a usable link
                        link.fail(RedisConnectionError("Redis refused the connection's AUTH or SELECT"))
                        raise
        except TimeoutError:
            raise RedisTimeoutError(f"could not connect to Redis within {e.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise RedisConnectionError(f"could not connect to Redis: {exc.strerror or exc}") from None
        return link

    async def aclose(self) -> None:
        self._closed = True
        if self._link is not None:
            self._link.fail(RedisConnectionError("the Redis transport is closed"))
            self._link = None
