"""Raw HTTP/1.1 over a socket, for requests no HTTP client library will send (bad bytes in headers,
malformed header lines, unknown methods, half-sent requests)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> dict:
        return orjson.loads(self.body)


def request_bytes(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: sidecar"]
    lines += [name + b": " + value for name, value in headers or []]
    if body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def read_answer(reader: asyncio.StreamReader, timeout_s: float = 10) -> RawAnswer:
    async with asyncio.timeout(timeout_s):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length)
    return RawAnswer(int(status_line.split(" ")[1]), headers, body)


async def exchange(port: int, data: bytes, host: str = "127.0.0.1", timeout_s: float = 10) -> RawAnswer:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader, timeout_s)
    finally:
        writer.close()


async def closed_by_peer(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """True if the server closes the connection within timeout_s (whatever it sent before)."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True
