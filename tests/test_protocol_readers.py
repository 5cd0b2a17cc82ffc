"""The stream readers and body readers of every protocol against what real providers send: any JSON
spacing, field order and escapes, usage that does not parse, Anthropic's cumulative message_delta, and
arbitrary JSON in every field a reader touches. Pure: bytes in, facts out."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.pricing import Usage
from sidecar.protocols import (
    anthropic_messages,
    openai_chat,
    openai_common,
    openai_completions,
    openai_embeddings,
    openai_responses,
)
from sidecar.protocols.base import RequestFacts
from sidecar.protocols.errors import SidecarError
from sidecar.sse import SSEFramer

FIXTURES = Path(__file__).parent / "fixtures"
STREAMS = {
    "chat": (openai_chat.PROTOCOL, (FIXTURES / "openai_chat_stream.sse").read_bytes()),
    "completions": (openai_completions.PROTOCOL, (FIXTURES / "openai_completions_stream.sse").read_bytes()),
    "responses": (openai_responses.PROTOCOL, (FIXTURES / "openai_responses_stream.sse").read_bytes()),
    "anthropic": (anthropic_messages.PROTOCOL, (FIXTURES / "anthropic_messages_stream.sse").read_bytes()),
}


def carries_usage(value: dict) -> bool:
    """The event with the stream's final usage: cut there, and the readers must estimate from the text."""
    return value.get("choices") == [] or value.get("type") in ("response.completed", "message_delta")


def facts(model: str = "m") -> RequestFacts:
    return RequestFacts(model, True, None)


def events_of(stream: bytes) -> list:
    framer = SSEFramer()
    events = framer.feed(stream)
    tail = framer.flush()
    return [*events, tail] if tail is not None else events


def read(protocol, stream: bytes):
    reader = protocol.stream_reader(facts())
    for event in events_of(stream):
        reader.observe(event)
    return reader


def reformat(stream: bytes, spaced: bool, cut: bool = False) -> bytes:
    """The same events, each data JSON re-serialised: with spaces after ':' and ',', keys in reverse
    order and every non-ASCII character escaped (as Python's json module and many OpenAI-compatible
    servers write it), or compact."""
    out = []
    for event in events_of(stream):
        if event.is_comment_only or not event.data or event.data == b"[DONE]":
            out.append(event.raw)
            continue
        value = orjson.loads(event.data)
        if cut and carries_usage(value):
            break
        if spaced:
            value = _reversed_keys(value)
            data = json.dumps(value, ensure_ascii=True).encode()
        else:
            data = orjson.dumps(value)
        name = b"event: " + event.event.encode() + b"\n" if event.event else b""
        out.append(name + b"data: " + data + b"\n\n")
    return b"".join(out)


def _reversed_keys(value):
    if isinstance(value, dict):
        return {k: _reversed_keys(v) for k, v in reversed(value.items())}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


# --- 15.6: the observed-output estimate does not depend on JSON formatting ------------------------------------


@pytest.mark.parametrize("name", list(STREAMS))
def test_output_estimate_is_the_same_whatever_the_json_formatting(name: str) -> None:
    protocol, stream = STREAMS[name]
    compact = read(protocol, reformat(stream, spaced=False, cut=True))
    spaced = read(protocol, reformat(stream, spaced=True, cut=True))
    compact_usage, compact_estimated = compact.observed(1000)
    spaced_usage, spaced_estimated = spaced.observed(1000)
    assert compact_estimated and spaced_estimated
    assert compact.content_chars > 0, "the text relayed before the cut counts"
    assert spaced.content_chars == compact.content_chars
    assert spaced_usage == compact_usage and spaced_usage.output_tokens > 0


@pytest.mark.parametrize("name", list(STREAMS))
def test_spaced_streams_give_the_same_final_usage_and_model(name: str) -> None:
    protocol, stream = STREAMS[name]
    compact = read(protocol, reformat(stream, spaced=False))
    spaced = read(protocol, reformat(stream, spaced=True))
    assert compact.usage is not None and compact.has_final_usage
    assert (spaced.usage, spaced.model, spaced.has_final_usage) == (compact.usage, compact.model, True)


def test_tool_call_arguments_count_for_the_estimate() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "x" * 40}}]}}]}
    reader = read(openai_chat.PROTOCOL, b"data: " + json.dumps(chunk).encode() + b"\n\n")
    assert reader.observed(0) == (Usage(input_tokens=0, output_tokens=10), True)


# --- 15.5: usage that does not parse is missing, never zero --------------------------------------------------

CHAT_USAGE = {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}
BAD_CHAT_USAGES = [
    {"prompt_tokens": 19.0, "completion_tokens": 10},
    {"prompt_tokens": "19", "completion_tokens": "10"},
    {"prompt_tokens": 19, "completion_tokens": 10.5},
    {"input_tokens": 19, "output_tokens": 10},  # another field name
    {"prompt_tokens": 19},
    {"prompt_tokens": True, "completion_tokens": 10},
    {"prompt_tokens": -1, "completion_tokens": 10},
    {"prompt_tokens": 19, "completion_tokens": 10, "prompt_tokens_details": {"cached_tokens": "4"}},
    {"prompt_tokens": 19, "completion_tokens": 10, "prompt_tokens_details": "lots"},
    {"prompt_tokens": 19, "completion_tokens": 10, "completion_tokens_details": {"reasoning_tokens": 1.5}},
]


@pytest.mark.parametrize("usage", BAD_CHAT_USAGES)
@pytest.mark.parametrize("protocol", [openai_chat.PROTOCOL, openai_completions.PROTOCOL])
def test_unparsable_openai_usage_is_missing(protocol, usage: dict) -> None:
    assert protocol.read_body(orjson.dumps({"usage": CHAT_USAGE})).usage == Usage(19, 10)
    assert protocol.read_body(orjson.dumps({"usage": usage})).usage is None
    stream = b'data: {"choices":[{"index":0,"delta":{"content":"abcdefgh"},"finish_reason":"stop"}]}\n\n'
    stream += b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n"
    reader = read(protocol, stream)
    assert reader.usage is None and not reader.has_final_usage
    estimate, estimated = reader.observed(400)
    assert estimated and estimate.input_tokens == 100
    assert estimate.output_tokens == (2 if protocol is openai_chat.PROTOCOL else 0)


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": 5.0, "output_tokens": 3},
        {"input_tokens": "5", "output_tokens": 3},
        {"prompt_tokens": 5, "completion_tokens": 3},
        {"input_tokens": 5, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 1e2}},
        {"input_tokens": 5},
    ],
)
def test_unparsable_responses_usage_is_missing(usage: dict) -> None:
    protocol = openai_responses.PROTOCOL
    assert protocol.read_body(orjson.dumps({"usage": {"input_tokens": 5, "output_tokens": 3}})).usage == Usage(5, 3)
    assert protocol.read_body(orjson.dumps({"usage": usage})).usage is None
    delta = {"type": "response.output_text.delta", "delta": "abcd"}
    done = {"type": "response.completed", "response": {"model": "m", "usage": usage}}
    stream = b"data: " + orjson.dumps(delta) + b"\n\ndata: " + orjson.dumps(done) + b"\n\n"
    reader = read(protocol, stream)
    assert reader.done and reader.usage is None and not reader.has_final_usage
    assert reader.observed(40) == (Usage(input_tokens=10, output_tokens=1), True)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 8.0, "total_tokens": 8},
        {"prompt_tokens": "8"},
        {"input_tokens": 8},
    ],
)
def test_unparsable_embeddings_usage_is_missing(usage: dict) -> None:
    protocol = openai_embeddings.PROTOCOL
    assert protocol.read_body(orjson.dumps({"usage": {"prompt_tokens": 8, "total_tokens": 8}})).usage == Usage(8)
    assert protocol.read_body(orjson.dumps({"usage": usage})).usage is None


@pytest.mark.parametrize(
    ("start", "delta"),
    [
        ({"input_tokens": 50.0, "output_tokens": 1}, {"output_tokens": 7}),
        ({"input_tokens": "50", "output_tokens": 1}, {"output_tokens": 7}),
        ({"input_tokens": 50, "output_tokens": 1}, {"output_tokens": "7"}),
        ({"input_tokens": 50, "output_tokens": 1}, {"output_tokens": 7.0}),
        ({"input_tokens": 50}, {"completion_tokens": 7}),
        ({"input_tokens": 50, "cache_read_input_tokens": "9"}, {"output_tokens": 7}),
        ({"prompt_tokens": 50}, {"output_tokens": 7}),
    ],
)
def test_unparsable_anthropic_usage_is_missing(start: dict, delta: dict) -> None:
    protocol = anthropic_messages.PROTOCOL
    assert protocol.read_body(orjson.dumps({"usage": {"input_tokens": 50, "output_tokens": 7}})).usage == Usage(50, 7)
    assert protocol.read_body(orjson.dumps({"usage": {**start, **delta}})).usage is None
    reader = read(protocol, anthropic_stream(start, delta))
    assert reader.done and reader.usage is None and not reader.has_final_usage
    usage, estimated = reader.observed(400)
    assert estimated and usage.output_tokens == 2  # "abcdefgh": estimated from the text relayed


def anthropic_stream(start_usage: dict, *delta_usages: dict) -> bytes:
    events = [
        ("message_start", {"type": "message_start", "message": {"model": "claude", "usage": start_usage}}),
        ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "abcdefgh"}}),
        *(("message_delta", {"type": "message_delta", "usage": usage}) for usage in delta_usages),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data)) for name, data in events)


# --- 15.13: Anthropic's message_delta usage is cumulative; a 0 there never erases message_start's -------------

START = {
    "input_tokens": 2095,
    "cache_creation_input_tokens": 1000,
    "cache_read_input_tokens": 512,
    "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
    "output_tokens": 1,
}
FULL = Usage(
    input_tokens=2095, output_tokens=15, cache_read_tokens=512, cache_write_5m_tokens=400, cache_write_1h_tokens=600
)


@pytest.mark.parametrize(
    "delta",
    [
        {"output_tokens": 15},
        {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 15},
        {"input_tokens": None, "cache_read_input_tokens": None, "output_tokens": 15, "server_tool_use": None},
        {
            "input_tokens": 2095,
            "cache_creation_input_tokens": 1000,
            "cache_read_input_tokens": 512,
            "output_tokens": 15,
        },
        {"input_tokens": 0, "cache_creation": {"ephemeral_1h_input_tokens": 0}, "output_tokens": 15},
    ],
    ids=["output-only", "zeros", "nulls", "repeated", "zero-split"],
)
def test_message_delta_zero_or_absent_input_keeps_message_start_counts(delta: dict) -> None:
    reader = read(anthropic_messages.PROTOCOL, anthropic_stream(START, delta))
    assert reader.usage == FULL and reader.has_final_usage
    assert reader.observed(1) == (FULL, False)


def test_message_delta_input_counts_above_message_start_are_taken() -> None:
    # Input known only at the end (message_start said 0): the cumulative delta's count is the call's.
    reader = read(
        anthropic_messages.PROTOCOL, anthropic_stream({"input_tokens": 0}, {"input_tokens": 40, "output_tokens": 3})
    )
    assert reader.usage == Usage(input_tokens=40, output_tokens=3)


def test_output_is_the_last_cumulative_message_delta() -> None:
    reader = read(anthropic_messages.PROTOCOL, anthropic_stream(START, {"output_tokens": 6}, {"output_tokens": 15}))
    assert reader.usage == FULL


# --- what the relay reads to keep reading after a hang-up: final usage means final ------------------------------


def test_openrouter_style_usage_on_a_chunk_with_choices_is_final_after_the_finish() -> None:
    first = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}], "usage": None}
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}], "usage": CHAT_USAGE}
    reader = openai_chat.PROTOCOL.stream_reader(facts())
    for chunk in (first, finish, usage):
        assert reader.observe(events_of(b"data: " + orjson.dumps(chunk) + b"\n\n")[0])
    assert reader.has_final_usage and not reader.done and reader.usage == Usage(19, 10)


def test_usage_on_every_chunk_is_not_final_until_the_choice_finished() -> None:
    # vLLM's continuous usage stats: every chunk carries the running count.
    reader = openai_chat.PROTOCOL.stream_reader(facts())
    running = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}], "usage": CHAT_USAGE}
    reader.observe(events_of(b"data: " + orjson.dumps(running) + b"\n\n")[0])
    assert reader.usage == Usage(19, 10) and not reader.has_final_usage
    # Cut here: the running count is better than a guess from bytes, and still flagged as an estimate.
    assert reader.observed(4000) == (Usage(19, 10), True)


# --- 8.15: arbitrary JSON in any field a reader touches never raises --------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _paths(value, prefix=()):
    """Every position in a JSON value: each dict value and list item, nested."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def _templates() -> list[tuple[str, object, str | None, dict]]:
    """(protocol, reader kind, SSE event name, JSON) for every event and body shape the readers read."""
    out = []
    for name, (protocol, stream) in STREAMS.items():
        for event in events_of(stream):
            if event.data and event.data != b"[DONE]":
                out.append((name, protocol, event.event, orjson.loads(event.data)))
    out += [
        ("chat", openai_chat.PROTOCOL, None, {"error": {"message": "overloaded", "type": "server_error"}}),
        ("responses", openai_responses.PROTOCOL, "error", {"type": "error", "code": "x", "message": "m"}),
        (
            "responses",
            openai_responses.PROTOCOL,
            "response.failed",
            {
                "type": "response.failed",
                "response": {"error": {"message": "m"}, "usage": {"input_tokens": 1, "output_tokens": 0}},
            },
        ),
        (
            "anthropic",
            anthropic_messages.PROTOCOL,
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "m"}},
        ),
        (
            "embeddings",
            openai_embeddings.PROTOCOL,
            None,
            {"model": "e", "usage": {"prompt_tokens": 8, "total_tokens": 8}},
        ),
    ]
    return out


TEMPLATES = _templates()
POSITIONS = [(i, path) for i, (_, _, _, value) in enumerate(TEMPLATES) for path in _paths(value)]


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(POSITIONS), JSON_VALUES)
def test_any_json_in_any_field_never_raises(position: tuple[int, tuple], value: object) -> None:
    index, path = position
    name, protocol, event_name, template = TEMPLATES[index]
    data = orjson.dumps(_replaced(template, path, value))
    # As a whole body: usage parses or is missing.
    body = protocol.read_body(data)
    assert body.usage is None or isinstance(body.usage, Usage)
    assert body.error is None or isinstance(body.error, str)
    if name == "embeddings":
        return
    # As a stream event, after the stream's real start and before its real end.
    _, stream = STREAMS[name]
    events = events_of(stream)
    mutated = b"event: %s\ndata: %s\n\n" % (event_name.encode(), data) if event_name else b"data: %s\n\n" % data
    for cut in (1, len(events) // 2, len(events)):
        reader = protocol.stream_reader(facts())
        for event in [*events[:cut], *events_of(mutated), *events[cut:]]:
            assert reader.observe(event) in (True, False)
        assert reader.usage is None or isinstance(reader.usage, Usage)
        assert reader.error is None or isinstance(reader.error, str)
        assert reader.model is None or isinstance(reader.model, str)
        usage, estimated = reader.observed(100)
        assert isinstance(usage, Usage) and isinstance(estimated, bool)
        assert isinstance(reader.has_final_usage, bool)


# --- 15.11: whether the body bounds the input is decided from the parsed request --------------------------------


@pytest.mark.parametrize(
    ("protocol", "raw", "unbounded"),
    [
        (openai_chat.PROTOCOL, b'{"model":"m","messages":[{"role":"user","content":"an image_url"}]}', False),
        (
            openai_chat.PROTOCOL,
            b'{"model":"m","messages":[{"role":"user","content":[{"type":"\\u0069mage_url"}]}]}',
            True,
        ),
        # What SDKs echo back from a previous answer (`message.model_dump()`): nulls are not media or audio.
        (
            openai_chat.PROTOCOL,
            b'{"model":"m","messages":[{"role":"assistant","content":"x","audio":null,"refusal":null}]}',
            False,
        ),
        (openai_completions.PROTOCOL, b'{"model":"m","prompt":[[1,2,3]]}', False),
        (openai_responses.PROTOCOL, b'{"model":"m","input":"x","background":false,"previous_response_id":null}', False),
        (openai_responses.PROTOCOL, b'{"model":"m","input":[{"type":"item_reference","id":"msg_1"}]}', True),
        (
            openai_responses.PROTOCOL,
            b'{"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_url":"u"}]}]}',
            True,
        ),
        (openai_responses.PROTOCOL, b'{"model":"m","input":"x","tools":[{"type":"function","name":"f"}]}', False),
        (anthropic_messages.PROTOCOL, b'{"model":"m","max_tokens":1,"messages":[],"mcp_servers":[{"url":"u"}]}', True),
        (anthropic_messages.PROTOCOL, b'{"model":"m","max_tokens":1,"messages":[],"tools":[{"name":"f"}]}', False),
        (openai_embeddings.PROTOCOL, b'{"model":"m","input":[[1,2],[3]]}', False),
    ],
)
def test_input_unbounded_is_read_from_the_parsed_request(protocol, raw: bytes, unbounded: bool) -> None:
    assert protocol.read_request(orjson.loads(raw)).input_unbounded is unbounded


def test_audio_anywhere_is_found_and_named() -> None:
    """Audio is priced per audio token: the request's reach says so (a target without an audio price
    refuses it, proxy/routing.py) and names the field, and its input is not bounded by its bytes."""
    payload = {"model": "m", "messages": [{"role": "assistant", "content": "x", "audio": {"id": "audio_1"}}]}
    facts = openai_chat.PROTOCOL.read_request(payload)
    assert facts.reach.audio_in and facts.reach.param_of("audio input") == "audio" and facts.input_unbounded
    assert not openai_chat.PROTOCOL.read_request({"model": "m", "messages": []}).reach.audio_in


EVENT_NAMES = st.sampled_from(
    [
        None,
        *("message_start", "message_delta", "message_stop", "content_block_delta", "error", "ping"),
        *("response.completed", "response.failed", "response.output_text.delta", "response.created"),
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(list(STREAMS)), st.lists(st.tuples(EVENT_NAMES, st.binary(max_size=64)), max_size=6))
def test_any_bytes_as_event_data_never_raise(name: str, events: list) -> None:
    protocol, _ = STREAMS[name]
    reader = protocol.stream_reader(facts())
    for event_name, data in events:
        block = (b"event: %s\n" % event_name.encode() if event_name else b"") + b"data: " + data + b"\n\n"
        for event in events_of(block):
            assert reader.observe(event) in (True, False)
    assert isinstance(reader.observed(10)[0], Usage)
    body = protocol.read_body(b"".join(d for _, d in events))
    assert body.usage is None or isinstance(body.usage, Usage)


REQUESTS = [
    (
        openai_chat.PROTOCOL,
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {}}]}
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 5,
            "max_completion_tokens": 6,
            "n": 2,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "models": ["a"],
            "plugins": [{"id": "file-parser", "pdf": {"engine": "pdf-text"}}],
            "provider": {"order": ["x"]},
            "service_tier": "auto",
            "modalities": ["text"],
        },
    ),
    (openai_completions.PROTOCOL, {"model": "m", "prompt": ["a", "b"], "n": 2, "best_of": 3, "max_tokens": 5}),
    (openai_embeddings.PROTOCOL, {"model": "m", "input": ["a", [1, 2]]}),
    (
        openai_responses.PROTOCOL,
        {
            "model": "m",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]}],
            "max_output_tokens": 5,
            "previous_response_id": "r",
            "tools": [{"type": "mcp"}],
            "background": False,
        },
    ),
    (
        anthropic_messages.PROTOCOL,
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
            "tools": [{"name": "f", "input_schema": {}}],
            "mcp_servers": [],
        },
    ),
]
REQUEST_POSITIONS = [(i, path) for i, (_, payload) in enumerate(REQUESTS) for path in _paths(payload) if path]


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(REQUEST_POSITIONS), JSON_VALUES)
def test_any_json_in_any_request_field_is_facts_or_a_400(position: tuple[int, tuple], value: object) -> None:
    index, path = position
    protocol, template = REQUESTS[index]
    payload = orjson.loads(orjson.dumps(_replaced(template, path, value)))
    try:
        parsed = protocol.read_request(payload)
    except SidecarError as error:
        assert error.status == 400 and error.message
        protocol.error_body(error)  # renders in the protocol's envelope
        return
    assert isinstance(parsed.input_unbounded, bool)
    assert parsed.max_output_tokens is None or 1 <= parsed.max_output_tokens <= 10**9
    cap = parsed.max_output_tokens or 100
    for to_openrouter in (False, True):
        assert orjson.loads(protocol.rewrite_request(payload, parsed, "up", cap, to_openrouter))["model"] == "up"


# --- issue 16.3: the classes beyond text tokens, read from usage; search calls bounded ---------------------


def test_openai_usage_splits_audio_image_and_reasoning_into_their_classes() -> None:
    usage = openai_common.usage_from_object(
        {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 10, "audio_tokens": 30, "image_tokens": 5},
            "completion_tokens_details": {"reasoning_tokens": 8, "audio_tokens": 20},
        }
    )
    assert usage == Usage(
        input_tokens=55,
        cache_read_tokens=10,
        input_audio_tokens=30,
        input_image_tokens=5,
        output_tokens=30,
        output_audio_tokens=20,
        reasoning_tokens=8,
    )
    assert usage.total_input_tokens == 100 and usage.total_output_tokens == 50
    # Details that claim more than their total are clamped to it, never a negative class.
    lying = openai_common.usage_from_object(
        {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"audio_tokens": 50}}
    )
    assert (lying.input_tokens, lying.input_audio_tokens) == (0, 10)


def test_responses_counts_search_calls_and_bounds_them_per_call() -> None:
    protocol = openai_responses.PROTOCOL
    payload = {"model": "m", "input": "x", "tools": [{"type": "web_search"}, {"type": "file_search"}]}
    facts = protocol.read_request(payload)
    assert (facts.reach.web_searches_max, facts.reach.file_searches_max) == (5, 5) and facts.input_unbounded
    sent = orjson.loads(protocol.rewrite_request(payload, facts, "m", 10, False))
    assert sent["max_tool_calls"] == 5  # the bound the hold assumed, injected
    bounded = protocol.read_request({**payload, "max_tool_calls": 2})
    assert bounded.reach.web_searches_max == 2
    assert (
        orjson.loads(protocol.rewrite_request({**payload, "max_tool_calls": 2}, bounded, "m", 10, False))[
            "max_tool_calls"
        ]
        == 2
    )
    body = {
        "usage": {"input_tokens": 10, "output_tokens": 4},
        "output": [{"type": "web_search_call"}, {"type": "web_search_call"}, {"type": "file_search_call"}, {}],
    }
    usage = protocol.read_body(orjson.dumps(body)).usage
    assert (usage.web_searches, usage.file_searches, usage.input_tokens) == (2, 1, 10)


def test_anthropic_web_search_is_bounded_per_tool_and_counted_from_usage() -> None:
    protocol = anthropic_messages.PROTOCOL
    tools = [{"type": "web_search_20250305", "name": "web_search"}, {"type": "web_search_20250305", "max_uses": 2}]
    payload = {"model": "m", "max_tokens": 5, "messages": [], "tools": tools}
    facts = protocol.read_request(payload)
    assert facts.reach.web_searches_max == 5 + 2
    sent = orjson.loads(protocol.rewrite_request(payload, facts, "m", 5, False))
    assert [t["max_uses"] for t in sent["tools"]] == [5, 2]
    usage = anthropic_messages.usage_from_fields(
        {"input_tokens": 10, "output_tokens": 3, "server_tool_use": {"web_search_requests": 3}}
    )
    assert usage.web_searches == 3
    assert protocol.long_context({"anthropic-beta": "prompt-caching-2024-07-31, context-1m-2025-08-07"})
    assert not protocol.long_context({})


def test_search_tools_on_a_route_that_cannot_bound_them_are_refused() -> None:
    payload = {"model": "m", "messages": [], "tools": [{"type": "web_search_preview"}]}
    with pytest.raises(SidecarError) as caught:
        openai_chat.PROTOCOL.read_request(payload)
    assert caught.value.code == "unsupported_feature" and caught.value.param == "tools"
