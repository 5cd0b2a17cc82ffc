"""Serving an app on a port, hardened where aiohttp's defaults are not (issue 8: 3, 9, 13, 17).

At the socket (a RequestHandler of our own, one per connection):
- a connection past the port's budget gets a 503 in the port's envelope and is closed;
- a request's head must arrive within the header timeout (counted from the connection's opening for
  its first request, from the first byte of each later one); an idle keep-alive connection is closed
  after the keep-alive timeout (aiohttp's own timer);
- what aiohttp's parser refuses (a header over 8 KB, a bad character, an unknown method, an unknown
  Content-Encoding) is answered in the envelope of the protocol its path belongs to, and logged as
  one line naming the kind of fault: never the raw header line, which may carry a key.

Inside the app (the `guard` middleware, outermost):
- the body must arrive within the body timeout (408), fit the size limit (413), and decode as its
  Content-Encoding says (400);
- an unknown path or method (404/405) is answered in the envelope;
- a source address that keeps failing authentication is refused (429) before any key lookup.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from sidecar.auth import FailedAuthLimiter
from sidecar.protocols import ALL as PROTOCOLS
from sidecar.protocols.errors import SidecarError

log = logging.getLogger("sidecar.serving")

# (path or None when unknown, HTTP status, message, code) -> the JSON body of the error.
ErrorBody = Callable[[str | None, int, str, str], bytes]
ERROR_BODY = web.AppKey("error_body", object)
OPEN_FILES_MAX = 65_536
_HEAD_PREFIX_BYTES = 256  # enough of a request's first line to know its path
LISTEN_BACKLOG = 128  # aiohttp's own default


@dataclass(frozen=True, slots=True)
class Limits:
    header_read_timeout_s: float
    keepalive_timeout_s: float
    connections_max: int


# --- envelopes -------------------------------------------------------------------------------------

_KIND_OF_STATUS = {
    400: "invalid_request",
    401: "authentication",
    403: "permission",
    404: "not_found",
    405: "invalid_request",
    408: "timeout",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
    504: "timeout",
}


def protocol_error_body(path: str | None, status: int, message: str, code: str) -> bytes:
    """The data plane's envelope: the protocol whose route the path is under (OpenAI's by default)."""
    protocol = PROTOCOLS[0]
    for candidate in PROTOCOLS:
        if path is not None and (path == candidate.route or path.startswith(candidate.route + "/")):
            protocol = candidate
    kind = _KIND_OF_STATUS.get(status, "internal" if status >= 500 else "invalid_request")
    return protocol.error_body(SidecarError(kind, message, code=code))


def plain_error_body(path: str | None, status: int, message: str, code: str) -> bytes:
    """For ports without a client protocol (ops)."""
    return orjson.dumps({"error": {"message": message, "code": code}})


def error_response(request: web.BaseRequest, status: int, message: str, code: str, **headers: str) -> web.Response:
    render = request.app.get(ERROR_BODY, plain_error_body) if isinstance(request, web.Request) else plain_error_body
    body = render(request.path, status, message, code)
    headers = {"x-request-id": uuid.uuid4().hex, **headers}  # as every answer has, for support to find it
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


# --- inside the app ----------------------------------------------------------------------------------


def guard(error_body: ErrorBody, body_read_timeout_s: float, limiter: FailedAuthLimiter | None = None):
    @web.middleware
    async def guard_middleware(request: web.Request, handler) -> web.StreamResponse:
        source = request.remote or "unknown"
        if limiter is not None and limiter.enabled and (wait_s := limiter.retry_after_s(source)):
            return error_response(
                request,
                429,
                "too many failed authentications from this address; retry later",
                "too_many_failed_authentications",
                **{"Retry-After": str(int(wait_s) + 1)},
            )
        if request.body_exists:
            refused = await _read_body(request, body_read_timeout_s)
            if refused is not None:
                return refused
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # the router's 404/405, or a handler's own
            if exc.status < 400:
                raise
            return _http_exception_response(request, exc)
        if limiter is not None and limiter.enabled and response.status == 401:
            limiter.failed(source)
        return response

    return guard_middleware


async def _read_body(request: web.Request, timeout_s: float) -> web.Response | None:
    """Reads (and caches, for the handler) the whole body; an error response if it cannot."""
    try:
        if request.content.is_eof():  # the whole body came with the head (most calls): no timer to arm
            await request.read()
        else:
            async with asyncio.timeout(timeout_s):
                await request.read()
    except TimeoutError:
        return error_response(
            request, 408, f"the request body did not arrive within {timeout_s:g} s", "request_body_timeout"
        )
    except web.HTTPRequestEntityTooLarge:
        limit = request.client_max_size
        return error_response(request, 413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
    except web.RequestPayloadError as exc:
        if isinstance(exc.__cause__, ContentEncodingError):
            encoding = request.headers.get("Content-Encoding", "")[:32]
            message = f"the request body is not valid {encoding} data, as its Content-Encoding header says"
            return error_response(request, 400, message, "invalid_content_encoding")
        return error_response(request, 400, "the request body could not be read", "invalid_body")
    return None


def _http_exception_response(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        message, code = f"no route {request.path[:200]!r}", "not_found"
    elif exc.status == 405:
        message, code = f"method {request.method[:20]} is not allowed on {request.path[:200]!r}", "method_not_allowed"
    else:
        message, code = exc.reason, "http_error"
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    return error_response(request, exc.status, message, code, **headers)


# --- at the socket -----------------------------------------------------------------------------------


class _Server(web.Server):
    """aiohttp's per-port server, making our RequestHandler and counting open connections."""

    def __init__(self, base: web.Server, limits: Limits, error_body: ErrorBody) -> None:
        # aiohttp has no public hook for the protocol class: take over the server it built.
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
        self.limits, self.error_body = limits, error_body
        self.open_connections = 0

    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class _RequestHandler(RequestHandler):
    """aiohttp's connection protocol with a connection budget, a header timeout and enveloped,
    secret-free answers to what its parser refuses."""

    __slots__ = ("_counted", "_head_prefix", "_head_timer", "_last_head_prefix", "_refused")

    def __init__(self, manager: _Server, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._counted = self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_prefix = b""  # the start of the request being received, for its path
        self._last_head_prefix = b""

    def connection_made(self, transport) -> None:
        server = self._manager
        if server.open_connections >= server.limits.connections_max:
            self._refused = True
            body = server.error_body(None, 503, "too many open connections; retry shortly", "too_many_connections")
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            transport.close()
            return
        server.open_connections += 1
        self._counted = True
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        if self._counted:
            self._counted = False
            self._manager.open_connections -= 1
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        waiting_for_head = not self._request_in_progress
        if waiting_for_head and len(self._head_prefix) < _HEAD_PREFIX_BYTES:
            self._head_prefix += data[: _HEAD_PREFIX_BYTES - len(self._head_prefix)]
        heads_before = self._request_count
        super().data_received(data)
        if self._request_count != heads_before:  # a head arrived (or the parser refused one)
            self._cancel_head_timer()
            self._last_head_prefix, self._head_prefix = self._head_prefix, b""
        elif data and waiting_for_head and self._head_timer is None:
            self._arm_head_timer()  # the first bytes of a request on a kept-alive connection

    def _arm_head_timer(self) -> None:
        timeout_s = self._manager.limits.header_read_timeout_s if self._manager else 0
        if timeout_s > 0:
            self._head_timer = self._loop.call_later(timeout_s, self._head_overdue, self._request_count)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self, heads_then: int) -> None:
        self._head_timer = None
        if self._request_count == heads_then and not self._request_in_progress:
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp logs the parser's message (which quotes the raw header line) and answers it as
        plain text. Instead: one line naming the fault, and the envelope."""
        if isinstance(exc, HttpProcessingError):
            path = _path_of(self._last_head_prefix)
            text, code = self._describe(exc)
            log.warning("refused a malformed request", extra={"http_status": status, "error": code})
        else:  # the handler itself failed: a bug, logged whole (the log formatter scrubs it)
            path = request.path
            text, code = ("the request timed out", "timeout") if status == 504 else ("internal error", "internal_error")
            if exc is not None:
                log.error("unhandled error while serving a request", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun; no error response can follow")
        response = web.Response(
            status=status, body=self._manager_error_body(path, status, text, code), content_type="application/json"
        )
        response.force_close()
        return response

    def log_exception(self, *args, **kwargs) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            # A body that failed to decode, seen again while draining it: already answered.
            log.warning(
                "dropped a connection whose request body could not be read", extra={"error": type(exc).__name__}
            )
            return
        super().log_exception(*args, **kwargs)

    def _manager_error_body(self, path: str | None, status: int, message: str, code: str) -> bytes:
        server = self._manager
        return (server.error_body if server is not None else plain_error_body)(path, status, message, code)

    def _describe(self, exc: HttpProcessingError) -> tuple[str, str]:
        if isinstance(exc, LineTooLong):
            return f"the request line or a header is longer than {self.max_field_size} bytes", "header_too_large"
        if isinstance(exc, BadHttpMethod):
            return "unsupported HTTP method", "method_not_supported"
        if isinstance(exc, ContentEncodingError):
            return "unsupported Content-Encoding; send gzip, deflate or no encoding", "unsupported_content_encoding"
        return "malformed HTTP request: a request line or header is not valid HTTP/1.1", "malformed_request"


def _path_of(head: bytes) -> str | None:
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) >= 2 and parts[1].startswith(b"/"):
        return parts[1].split(b"?", 1)[0].decode("latin-1")
    return None


class _Runner(web.AppRunner):
    def __init__(self, app: web.Application, limits: Limits, error_body: ErrorBody, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self._limits, self._error_body = limits, error_body
        self.listening: list[socket.socket] = []  # the sockets of a shared port (start(reuse_port=True))

    async def _make_server(self) -> web.Server:
        return _Server(await super()._make_server(), self._limits, self._error_body)


async def start(
    app: web.Application, host: str, port: int, limits: Limits, shutdown_timeout_s: float, reuse_port: bool = False
) -> web.AppRunner:
    """Serve `app` on host:port; the caller cleans the runner up. Port 0 picks a free port
    (runner.addresses has it). reuse_port: the port may be shared with other processes (SO_REUSEPORT,
    the kernel spreads new connections over them), so a replacement starts beside a draining one; call
    stop_accepting() first at shutdown."""
    runner = _Runner(
        app,
        limits,
        app.get(ERROR_BODY, plain_error_body),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_timeout_s,
        keepalive_timeout=limits.keepalive_timeout_s,
    )
    await runner.setup()
    if not reuse_port:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        return runner
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        runner.listening.append(sock)
        await web.SockSite(runner, sock).start()
    return runner


async def stop_accepting(runner: web.AppRunner) -> None:
    """Close a runner's listeners. On a shared port (start(reuse_port=True)), connections the kernel
    already queued on this process's socket would be reset when it closes, not handed to the other
    process: accept them first (they are served like any other), then close at once, so the other
    process takes every connection made after this point."""
    loop = asyncio.get_running_loop()
    for sock in getattr(runner, "listening", ()):
        for _ in range(LISTEN_BACKLOG * 4):  # bounded: a flood cannot hold the shutdown here
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # already closed
                break
            conn.setblocking(False)
            await loop.connect_accepted_socket(runner.server, conn)
    for site in list(runner.sites):
        await site.stop()


def raise_file_limit() -> int:
    """Lift the soft open-file limit to the hard one (bounded); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard if hard != resource.RLIM_INFINITY else OPEN_FILES_MAX, OPEN_FILES_MAX)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else OPEN_FILES_MAX


def data_limits(server_config, file_limit: int) -> Limits:
    """The data and control ports' limits from `server:` config; connections_max 0 means half the
    open-file limit, leaving the rest to upstream connections, the databases and the ops port."""
    return Limits(
        header_read_timeout_s=server_config.header_read_timeout_ms / 1000,
        keepalive_timeout_s=server_config.keepalive_timeout_ms / 1000,
        connections_max=server_config.connections_max or max(file_limit // 2, 16),
    )


def ops_limits(server_config) -> Limits:
    return Limits(
        header_read_timeout_s=server_config.header_read_timeout_ms / 1000,
        keepalive_timeout_s=server_config.keepalive_timeout_ms / 1000,
        connections_max=server_config.ops_connections_max,
    )
