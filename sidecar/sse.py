"""Incremental Server-Sent Events framer: bytes in, complete events out, any chunk boundaries.

Pure (no I/O). The proxy feeds it every upstream chunk, relays each event's `raw` bytes verbatim and reads
usage from `data` on the side.

Framing follows the WHATWG SSE parsing rules: a line ends with CRLF, LF or CR; an event ends at a blank
line. A block's blank line therefore ends at the first `\\n\\n`, `\\n\\r` or `\\r\\r` (CRLF CRLF contains
`\\n\\r`; a CR right after the blank line's CR is one more byte of that CRLF and belongs to the event).

Choices worth knowing:
- Blank lines before an event (stray separators) are kept as a prefix of the next event's `raw`, so every
  byte received ends up in exactly one event and `b"".join(e.raw for e in events) == stream`.
- When a block's blank line is a CR that is the last buffered byte, the event is held until the next byte
  shows whether an LF completes that CRLF (or until `flush`). That keeps each `raw` the same whatever the
  chunking; the cost is one chunk of delay for CR-only streams, which no provider sends.
- Search resumes where the previous `feed` stopped, so an event spread over many chunks costs linear time.
- A block larger than `max_event_bytes` raises `SSEError`: a bound so a hostile upstream cannot grow memory
  forever. After that the framer's state is undefined; abandon the stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.errors import DomainError

__all__ = ["EVENT_BYTES_MAX_DEFAULT", "SSEError", "SSEEvent", "SSEFramer"]

EVENT_BYTES_MAX_DEFAULT = 4 * 1024 * 1024

_CR = 0x0D
_LF = 0x0A
_BOM = b"\xef\xbb\xbf"
# The three byte pairs that can only mean "line terminator, then an empty line" (see the module docstring).
_BLANK_LINE_WITH_CR = re.compile(rb"\n\n|\n\r|\r\r")


class SSEError(DomainError, ValueError):
    """The upstream stream breaks a framing bound (an event larger than max_event_bytes)."""


@dataclass(slots=True)
class SSEEvent:
    raw: bytes
    """The exact bytes of this event as received (with any stray blank lines before it and its terminating
    blank line), so a proxy can relay it verbatim."""
    event: str | None
    """Value of the last `event:` field, None if absent."""
    data: bytes
    """The `data:` lines joined with b"\\n" (one space after the colon stripped)."""
    is_comment_only: bool
    """True when the block held no field lines, only comments (e.g. OpenRouter's `: OPENROUTER PROCESSING`)
    or nothing at all (stray blank lines returned by flush)."""


class SSEFramer:
    def __init__(self, max_event_bytes: int = EVENT_BYTES_MAX_DEFAULT) -> None:
        if max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        self._max_event_bytes = max_event_bytes
        # Bytes of the event in progress (never a complete event once feed returns).
        self._pending = bytearray()
        # Offset in _pending where the blank-line search resumes: everything before it was already searched.
        self._search_from = 0
        # Until the first CR, a blank line can only be b"\n\n": one memchr-speed find instead of a regex.
        self._seen_cr = False
        self._at_stream_start = True

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes from the stream; return the events they complete, in order."""
        if not chunk:
            return []
        if not self._seen_cr and _CR in chunk:
            self._seen_cr = True
        if self._pending:
            self._pending += chunk
            buffer: bytes | bytearray = self._pending
        else:
            # Common case: the chunk holds whole events. Work on it directly, no copy into the buffer.
            buffer = chunk
        events: list[SSEEvent] = []
        event_start = 0
        search_from = self._search_from
        buffer_len = len(buffer)
        while True:
            found = self._find_event_end(buffer, event_start, search_from)
            if found is None:
                break
            block_end, raw_end = found
            self._check_size(raw_end - event_start)
            events.append(self._parse(buffer, event_start, block_end, raw_end))
            event_start = raw_end
            search_from = raw_end
            if event_start == buffer_len:
                break
        self._check_size(buffer_len - event_start)
        self._keep_pending(buffer, event_start)
        # Resume two bytes back: the last byte may pair with the next chunk's first, and a match held for a
        # possible CRLF (see _find_event_end) must be found again.
        self._search_from = max(0, search_from - event_start, buffer_len - event_start - 2)
        return events

    def flush(self) -> SSEEvent | None:
        """At end of stream: the buffered trailing event (unterminated, or held for a possible CRLF), if any.

        Returns None only when nothing is buffered. A browser would drop an unterminated event; the caller
        decides (its `raw` must still be relayed to stay byte-exact)."""
        buffer = bytes(self._pending)
        self._pending.clear()
        self._search_from = 0
        if not buffer:
            return None
        found = self._find_event_end(buffer, 0, 0, at_end=True)
        block_end = found[0] if found is not None else len(buffer)
        return self._parse(buffer, 0, block_end, len(buffer))

    def _check_size(self, event_bytes: int) -> None:
        if event_bytes > self._max_event_bytes:
            raise SSEError(f"SSE event exceeds {self._max_event_bytes} bytes")

    def _keep_pending(self, buffer: bytes | bytearray, event_start: int) -> None:
        if buffer is self._pending:
            del self._pending[:event_start]
        elif event_start < len(buffer):
            self._pending += memoryview(buffer)[event_start:]

    def _find_event_end(
        self, buffer: bytes | bytearray, event_start: int, search_from: int, at_end: bool = False
    ) -> tuple[int, int] | None:
        """(end of the block's last line, end of the event's raw bytes), or None when incomplete."""
        buffer_len = len(buffer)
        content_start = event_start
        # Stray blank lines belong to this event's raw prefix; they are short, so a byte loop is fine here.
        while content_start < buffer_len and buffer[content_start] in (_CR, _LF):
            content_start += 1
        search_from = max(search_from, content_start)
        if not self._seen_cr:
            blank_at = buffer.find(b"\n\n", search_from)
            if blank_at < 0:
                return None
            return blank_at, blank_at + 2
        match = _BLANK_LINE_WITH_CR.search(buffer, search_from)
        if match is None:
            return None
        blank_at = match.start()
        raw_end = blank_at + 2
        if buffer[raw_end - 1] == _CR:
            if raw_end == buffer_len:
                # The LF of a CRLF may be in the next chunk; wait so raw does not depend on chunking.
                return (blank_at, raw_end) if at_end else None
            if buffer[raw_end] == _LF:
                raw_end += 1
        return blank_at, raw_end

    def _parse(self, buffer: bytes | bytearray, event_start: int, block_end: int, raw_end: int) -> SSEEvent:
        raw = bytes(memoryview(buffer)[event_start:raw_end])
        block = raw[: block_end - event_start]
        if self._at_stream_start:
            self._at_stream_start = False
            # The spec strips one UTF-8 BOM at the start of the stream.
            stripped = block.lstrip(b"\r\n")
            if stripped.startswith(_BOM):
                block = stripped[len(_BOM) :]
        event_name: str | None = None
        data_lines: list[bytes] = []
        has_field = False
        for line in block.splitlines():
            if not line or line[0] == 0x3A:  # b":" starts a comment
                continue
            has_field = True
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data_lines.append(value)
            elif name == b"event":
                event_name = value.decode("utf-8", "replace")
            # `id`, `retry` and unknown fields are ignored, as the spec says; they stay in raw.
        data = data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)
        return SSEEvent(raw=raw, event=event_name, data=data, is_comment_only=not has_field)
