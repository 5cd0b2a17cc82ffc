from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.sse import SSEError, SSEEvent, SSEFramer


def frame_all(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> list[SSEEvent]:
    framer = SSEFramer(max_event_bytes=max_event_bytes)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(framer.feed(chunk))
    trailing = framer.flush()
    if trailing is not None:
        events.append(trailing)
    return events


def bytewise(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


# ---- unit tests -----------------------------------------------------------------------------------------


def test_openai_stream_with_done():
    stream = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    events = SSEFramer().feed(stream)
    assert [e.data for e in events] == [b'{"a":1}', b'{"b":2}', b"[DONE]"]
    assert [e.raw for e in events] == [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]
    assert all(e.event is None and not e.is_comment_only for e in events)


def test_named_events_anthropic_style():
    stream = b'event: message_start\ndata: {"x":1}\n\nevent: ping\ndata: {"type": "ping"}\n\n'
    events = SSEFramer().feed(stream)
    assert [(e.event, e.data) for e in events] == [
        ("message_start", b'{"x":1}'),
        ("ping", b'{"type": "ping"}'),
    ]


def test_comment_only_keepalive():
    events = SSEFramer().feed(b": OPENROUTER PROCESSING\n\ndata: {}\n\n")
    assert events[0].is_comment_only and events[0].data == b"" and events[0].event is None
    assert events[0].raw == b": OPENROUTER PROCESSING\n\n"
    assert not events[1].is_comment_only


def test_comment_mixed_with_data_is_not_comment_only():
    (event,) = SSEFramer().feed(b": hi\ndata: x\n\n")
    assert not event.is_comment_only and event.data == b"x"


def test_crlf_separator_split_everywhere():
    stream = b"event: e\r\ndata: one\r\n\r\ndata: two\r\n\r\n"
    for split_at in range(1, len(stream)):
        events = frame_all([stream[:split_at], stream[split_at:]])
        assert [e.data for e in events] == [b"one", b"two"], split_at
        assert [e.raw for e in events] == [b"event: e\r\ndata: one\r\n\r\n", b"data: two\r\n\r\n"], split_at


def test_cr_only_separator():
    stream = b"data: a\r\rdata: b\r\r"
    events = frame_all([stream])
    assert [e.data for e in events] == [b"a", b"b"]
    assert b"".join(e.raw for e in events) == stream


def test_event_ending_in_cr_is_held_until_next_byte():
    framer = SSEFramer()
    assert framer.feed(b"data: a\r\r") == []  # the next byte could be the LF of a CRLF
    (event,) = framer.feed(b"\ndata: b")
    assert event.raw == b"data: a\r\r\n" and event.data == b"a"
    trailing = framer.flush()
    assert trailing is not None and trailing.data == b"b" and trailing.raw == b"data: b"


def test_flush_returns_held_cr_event():
    framer = SSEFramer()
    assert framer.feed(b"data: a\r\n\r") == []
    trailing = framer.flush()
    assert trailing is not None and trailing.raw == b"data: a\r\n\r" and trailing.data == b"a"
    assert framer.flush() is None


def test_mixed_separators():
    stream = b"data: a\n\ndata: b\r\n\r\ndata: c\r\rdata: d\n\r\ndata: e\r\n\n"
    events = frame_all(bytewise(stream))
    assert [e.data for e in events] == [b"a", b"b", b"c", b"d", b"e"]
    assert b"".join(e.raw for e in events) == stream


def test_data_without_space_and_only_one_space_stripped():
    (a, b, c) = SSEFramer().feed(b"data:x\n\ndata:  two spaces\n\ndata\n\n")
    assert a.data == b"x"
    assert b.data == b" two spaces"
    assert c.data == b"" and not c.is_comment_only


def test_multiple_data_lines_joined_with_lf():
    (event,) = SSEFramer().feed(b"data: line1\ndata:line2\r\ndata: \n\n")
    assert event.data == b"line1\nline2\n"


def test_id_and_retry_ignored_but_kept_in_raw():
    stream = b"id: 7\nretry: 1000\nevent: x\ndata: d\nunknown: field\n\n"
    (event,) = SSEFramer().feed(stream)
    assert (event.event, event.data, event.raw) == ("x", b"d", stream)


def test_last_event_field_wins_and_colon_in_value_kept():
    (event,) = SSEFramer().feed(b"event: a\nevent: b\ndata: http://x:1\n\n")
    assert event.event == "b" and event.data == b"http://x:1"


def test_stray_blank_lines_are_prefixed_to_next_event():
    stream = b"\n\ndata: a\n\n\n\r\ndata: b\n\n"
    events = frame_all([stream])
    assert [e.raw for e in events] == [b"\n\ndata: a\n\n", b"\n\r\ndata: b\n\n"]
    assert [e.data for e in events] == [b"a", b"b"]


def test_flush_unterminated_trailing_event():
    framer = SSEFramer()
    assert framer.feed(b"data: a\n\ndata: partial\n")[0].data == b"a"
    trailing = framer.flush()
    assert trailing is not None and trailing.data == b"partial" and trailing.raw == b"data: partial\n"


def test_flush_returns_trailing_blank_lines_so_no_byte_is_lost():
    framer = SSEFramer()
    framer.feed(b"data: a\n\n\n")
    trailing = framer.flush()
    assert trailing is not None and trailing.raw == b"\n" and trailing.is_comment_only


def test_flush_empty():
    framer = SSEFramer()
    assert framer.flush() is None
    framer.feed(b"data: a\n\n")
    assert framer.flush() is None


def test_empty_chunk_is_noop():
    framer = SSEFramer()
    assert framer.feed(b"") == []
    assert framer.feed(b"data: a\n") == []
    assert framer.feed(b"") == []
    assert [e.data for e in framer.feed(b"\n")] == [b"a"]


def test_bytearray_and_memoryview_chunks():
    framer = SSEFramer()
    assert framer.feed(bytearray(b"data: a\n")) == []
    (event,) = framer.feed(memoryview(b"\n"))  # type: ignore[arg-type]
    assert event.data == b"a" and type(event.raw) is bytes and type(event.data) is bytes


def test_bom_at_stream_start_is_ignored_for_fields():
    (event,) = SSEFramer().feed(b"\xef\xbb\xbfdata: a\n\n")
    assert event.data == b"a" and event.raw.startswith(b"\xef\xbb\xbf")


def test_oversized_pending_event_raises():
    framer = SSEFramer(max_event_bytes=100)
    framer.feed(b"data: " + b"x" * 50)
    with pytest.raises(SSEError):
        framer.feed(b"x" * 60)


def test_oversized_complete_event_raises():
    with pytest.raises(SSEError):
        SSEFramer(max_event_bytes=100).feed(b"data: " + b"x" * 200 + b"\n\n")


def test_endless_blank_lines_are_bounded_too():
    framer = SSEFramer(max_event_bytes=100)
    with pytest.raises(SSEError):
        for _ in range(1000):
            framer.feed(b"\n" * 10)


def test_event_at_the_limit_is_accepted():
    event_bytes = b"data: " + b"x" * 92 + b"\n\n"
    assert len(event_bytes) == 100
    (event,) = SSEFramer(max_event_bytes=100).feed(event_bytes)
    assert event.raw == event_bytes


def test_sse_error_is_value_error():
    assert issubclass(SSEError, ValueError)


def test_large_event_over_many_chunks_is_linear_enough():
    # Many small chunks of one big event: must not rescan the whole buffer each time (would take minutes).
    framer = SSEFramer()
    for _ in range(20_000):
        assert framer.feed(b"x" * 100) == []
    (event,) = framer.feed(b"\n\n")
    assert len(event.raw) == 2_000_002


# ---- property tests -------------------------------------------------------------------------------------

_no_newline_bytes = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_no_newline_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=8
)

_line = st.one_of(
    st.tuples(st.just("data"), _no_newline_bytes, st.booleans()),
    st.tuples(st.just("data_bare"), st.just(b""), st.just(False)),
    st.tuples(st.just("event"), _no_newline_text.map(lambda t: t.encode()), st.booleans()),
    st.tuples(st.just("comment"), _no_newline_bytes, st.just(False)),
    st.tuples(st.sampled_from(["id", "retry"]), _no_newline_bytes, st.booleans()),
)


def _serialize_line(kind: str, value: bytes, with_space: bool) -> bytes:
    if kind == "comment":
        return b":" + value
    if kind == "data_bare":
        return b"data"
    name = b"data" if kind == "data" else kind.encode()
    # Without the space, a value that starts with a space would lose it: keep the space then.
    space = b" " if with_space or value.startswith(b" ") else b""
    return name + b":" + space + value


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[str | None, bytes, bool]]]:
    """A fully terminated stream of events and what each should parse to."""
    stream = bytearray()
    expected: list[tuple[str | None, bytes, bool]] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 4)) == 0:
            stream += draw(st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n"]))  # stray blank lines
        lines = draw(st.lists(_line, min_size=1, max_size=5))
        data_values: list[bytes] = []
        event_name: str | None = None
        terminator = b"\n"
        for kind, value, with_space in lines:
            terminator = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
            stream += _serialize_line(kind, value, with_space) + terminator
            if kind in ("data", "data_bare"):
                data_values.append(value)
            elif kind == "event":
                event_name = value.decode()
        # After a lone CR, a lone LF would complete a CRLF instead of making a blank line.
        blank_choices = [b"\r", b"\r\n"] if terminator == b"\r" else [b"\n", b"\r\n", b"\r"]
        stream += draw(st.sampled_from(blank_choices))
        is_comment_only = all(kind == "comment" for kind, _, _ in lines)
        expected.append((event_name, b"\n".join(data_values), is_comment_only))
    return bytes(stream), expected


@st.composite
def chunkings(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400)
@given(st.data())
def test_any_chunking_yields_the_serialized_events(data: st.DataObject) -> None:
    stream, expected = data.draw(event_streams())
    chunks = data.draw(chunkings(stream))
    events = frame_all(chunks)
    assert [(e.event, e.data, e.is_comment_only) for e in events] == expected
    assert b"".join(e.raw for e in events) == stream


def reference_parse(stream: bytes) -> list[SSEEvent]:
    """A slow, line-at-a-time reading of the SSE spec, to check the fast framer against."""
    events: list[SSEEvent] = []
    lines: list[bytes] = []
    raw_start = line_start = pos = 0

    def dispatch(raw_end: int) -> None:
        event: str | None = None
        data: list[bytes] = []
        has_field = False
        for line in lines:
            if line.startswith(b":"):
                continue
            has_field = True
            name, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value.decode("utf-8", "replace")
        events.append(SSEEvent(stream[raw_start:raw_end], event, b"\n".join(data), not has_field))

    while pos < len(stream):
        byte = stream[pos : pos + 1]
        if byte not in (b"\r", b"\n"):
            pos += 1
            continue
        line = stream[line_start:pos]
        pos += 2 if stream[pos : pos + 2] == b"\r\n" else 1
        line_start = pos
        if line:
            lines.append(line)
        elif lines:
            dispatch(pos)
            raw_start, lines = pos, []
    if stream[line_start:]:
        lines.append(stream[line_start:])
    if raw_start < len(stream):
        dispatch(len(stream))
    return events


_soup = st.lists(
    st.sampled_from([b"data", b"event", b"id", b":", b" ", b"x", b"\xff", b"\r", b"\n", b"\r\n"]),
    max_size=60,
).map(b"".join)


@settings(max_examples=600)
@given(st.data())
def test_arbitrary_bytes_match_reference_under_any_chunking(data: st.DataObject) -> None:
    stream = data.draw(_soup)
    chunks = data.draw(chunkings(stream))
    events = frame_all(chunks)
    assert events == reference_parse(stream)
    assert b"".join(e.raw for e in events) == stream
