"""Hypothesis strategies for the fuzz targets (tests/fuzz/): request bodies near and far from valid for
every protocol, provider answers (JSON bodies and SSE streams, with broken and hostile fields), and the
bytes and chunkings that carry them. Shared by the pure targets, the HTTP targets and the smoke test.

Generated values lean towards what the code reads (the protocols' own field names, integers at the
bounds the code checks, the models the test config serves) so most inputs get past the first check.
"""

from __future__ import annotations

import itertools
import json

from hypothesis import strategies as st

# Integers at every bound the code checks: 0, 1, int32, 2^53 (float exactness), int64, uint64 and past.
EDGE_INTS = (0, 1, -1, 2, 8, 100, 128, 129, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64)
EDGE_INTS += (*tuple(-n for n in EDGE_INTS[7:]), 10**9, 10**9 + 1, 10**12, 10**12 + 1, 10**30)

# Every request and response field any protocol reads, and a few it must treat as data.
FIELD_NAMES = (
    "model",
    "messages",
    "stream",
    "stream_options",
    "include_usage",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "prompt",
    "input",
    "instructions",
    "tools",
    "type",
    "function",
    "arguments",
    "content",
    "role",
    "text",
    "image_url",
    "input_image",
    "input_file",
    "file_id",
    "input_audio",
    "audio",
    "modalities",
    "service_tier",
    "web_search_options",
    "models",
    "provider",
    "route",
    "plugins",
    "transforms",
    "usage",
    "id",
    "pdf",
    "engine",
    "background",
    "previous_response_id",
    "conversation",
    "container",
    "mcp_servers",
    "metadata",
    "parameters",
    "input_schema",
    "cache_control",
    "system",
    "choices",
    "delta",
    "index",
    "finish_reason",
    "error",
    "message",
    "code",
    "response",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "input_tokens",
    "output_tokens",
    "input_tokens_details",
    "output_tokens_details",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cache_creation",
    "ephemeral_1h_input_tokens",
    "ephemeral_5m_input_tokens",
    "partial_json",
    "thinking",
    "refusal",
    "reasoning_content",
    "tool_calls",
    "function_call",
)
TYPE_VALUES = (
    "text",
    "function",
    "custom",
    "image",
    "image_url",
    "input_image",
    "input_file",
    "file",
    "document",
    "input_audio",
    "audio",
    "web_search",
    "web_search_20250305",
    "file_search",
    "code_execution",
    "computer_20250124",
    "mcp",
    "item_reference",
    "message_start",
    "message_delta",
    "message_stop",
    "content_block_delta",
    "error",
    "response.completed",
    "response.failed",
    "response.incomplete",
    "response.output_text.delta",
    "response.created",
)
# The models the fuzz sidecar serves (tests/fuzz/test_fuzz_http.py) and the harness's own.
MODEL_NAMES = (
    "gpt-4o-mini",
    "mini",
    "mock-free",
    "claude-test",
    "embed-small",
    "router-model",
    "fallback-503",
    "h-chat",
    "h-claude",
    "h-embed",
    "h-router",
)

edge_ints = st.sampled_from(EDGE_INTS)
small_ints = st.integers(min_value=-3, max_value=300)
field_names = st.sampled_from(FIELD_NAMES)
short_text = st.text(max_size=24)
words = st.sampled_from(FIELD_NAMES + TYPE_VALUES + MODEL_NAMES + ("", " ", "\u0000", "é", "[DONE]", "null"))

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    small_ints,
    edge_ints,
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    words,
    short_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(field_names, short_text), inner, max_size=5),
    ),
    max_leaves=14,
)
json_objects = st.dictionaries(st.one_of(field_names, short_text), json_values, max_size=6)


def dumps(value: object) -> bytes:
    """JSON the way any client may spell it: the stdlib encoder writes integers of any size (orjson
    stops at 2^64), which is exactly what the sidecar must refuse cleanly."""
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


# --- requests -----------------------------------------------------------------------------------------

_USER = {"role": "user", "content": "hello there"}
VALID_REQUESTS = {
    "/v1/chat/completions": {"model": "gpt-4o-mini", "messages": [_USER]},
    "/v1/completions": {"model": "gpt-4o-mini", "prompt": "hello there"},
    "/v1/embeddings": {"model": "embed-small", "input": "hello there"},
    "/v1/responses": {"model": "gpt-4o-mini", "input": "hello there"},
    "/v1/messages": {"model": "claude-test", "max_tokens": 20, "messages": [_USER]},
}
# Field values that change what a request costs or where it goes: each protocol's real options.
_OPTION_VALUES = {
    "stream": st.one_of(st.booleans(), json_scalars),
    "stream_options": st.one_of(st.just({"include_usage": True}), st.just({"include_usage": False}), json_values),
    "max_tokens": st.one_of(small_ints, edge_ints, json_scalars),
    "max_completion_tokens": st.one_of(small_ints, edge_ints, json_scalars),
    "max_output_tokens": st.one_of(small_ints, edge_ints, json_scalars),
    "n": st.one_of(st.integers(0, 200), edge_ints, json_scalars),
    "best_of": st.one_of(st.integers(0, 200), edge_ints, json_scalars),
    "prompt": st.one_of(short_text, st.lists(short_text, max_size=40), st.lists(st.lists(small_ints)), json_values),
    "input": st.one_of(short_text, st.lists(json_values, max_size=4), json_values),
    "messages": st.one_of(
        st.lists(st.fixed_dictionaries({"role": words, "content": st.one_of(short_text, json_values)}), max_size=3),
        json_values,
    ),
    "tools": st.one_of(st.lists(st.fixed_dictionaries({"type": words}), max_size=3), json_values),
    "modalities": st.one_of(st.lists(st.sampled_from(["text", "audio", "image"])), json_values),
    "service_tier": st.one_of(st.sampled_from(["auto", "default", "flex", "priority", "scale"]), json_scalars),
    "models": st.one_of(st.lists(st.sampled_from((*MODEL_NAMES, "router/dear", "x:online")), max_size=10), json_values),
    "plugins": st.one_of(st.lists(st.fixed_dictionaries({"id": words}), max_size=2), json_values),
    "model": st.one_of(st.sampled_from(MODEL_NAMES), json_scalars),
}


@st.composite
def request_payloads(draw, route: str | None = None) -> dict:
    """A request for `route` (any protocol when None): a valid one, with fields changed, added and removed."""
    base = dict(VALID_REQUESTS[route or draw(st.sampled_from(sorted(VALID_REQUESTS)))])
    for name in draw(st.lists(st.sampled_from(sorted(_OPTION_VALUES)), max_size=4, unique=True)):
        base[name] = draw(_OPTION_VALUES[name])
    base.update(draw(st.dictionaries(field_names, json_values, max_size=2)))
    for name in draw(st.lists(st.sampled_from(sorted(base) or ["model"]), max_size=1)):
        base.pop(name, None)
    return base


@st.composite
def mutated_bytes(draw, source: st.SearchStrategy[bytes]) -> bytes:
    """Bytes from `source` with a few bytes flipped, inserted or cut: JSON that breaks in every place."""
    data = bytearray(draw(source))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(("flip", "insert", "cut")))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=4))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


request_bytes = st.one_of(
    st.binary(max_size=64),
    mutated_bytes(request_payloads().map(dumps)),
    json_values.map(dumps),
    st.sampled_from([b"", b"null", b"[]", b"{}", b'{"model": 1e400}', b'"\\ud800"', b"\xef\xbb\xbf{}", b"{" * 300]),
)

# --- provider answers ---------------------------------------------------------------------------------

_counts = st.one_of(st.integers(0, 5000), edge_ints, json_scalars)


def _usage_object(fields: tuple[str, ...]) -> st.SearchStrategy[dict]:
    return st.one_of(
        st.fixed_dictionaries({name: st.integers(0, 5000) for name in fields}),
        st.fixed_dictionaries({}, optional={name: _counts for name in fields}),
        json_objects,
    )


chat_usage = _usage_object(("prompt_tokens", "completion_tokens", "total_tokens")).flatmap(
    lambda u: st.fixed_dictionaries(
        {},
        optional={
            "prompt_tokens_details": st.one_of(
                st.fixed_dictionaries({}, optional={"cached_tokens": _counts, "cache_write_tokens": _counts}),
                json_values,
            ),
            "completion_tokens_details": st.one_of(
                st.fixed_dictionaries({}, optional={"reasoning_tokens": _counts}), json_values
            ),
        },
    ).map(lambda extra: {**u, **extra})
)
responses_usage = _usage_object(("input_tokens", "output_tokens")).flatmap(
    lambda u: st.fixed_dictionaries(
        {},
        optional={
            "input_tokens_details": st.one_of(
                st.fixed_dictionaries({}, optional={"cached_tokens": _counts}), json_values
            ),
            "output_tokens_details": st.one_of(
                st.fixed_dictionaries({}, optional={"reasoning_tokens": _counts}), json_values
            ),
        },
    ).map(lambda extra: {**u, **extra})
)
anthropic_usage = _usage_object(
    ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
).flatmap(
    lambda u: st.fixed_dictionaries(
        {},
        optional={
            "cache_creation": st.one_of(
                st.fixed_dictionaries({}, optional={"ephemeral_1h_input_tokens": _counts}), json_values
            )
        },
    ).map(lambda extra: {**u, **extra})
)
any_usage = st.one_of(chat_usage, responses_usage, anthropic_usage, json_values)
models = st.one_of(st.sampled_from(MODEL_NAMES), json_scalars)
errors = st.one_of(
    st.fixed_dictionaries({"message": json_scalars}, optional={"type": words, "code": json_scalars}), json_values
)

_chat_choice = st.fixed_dictionaries(
    {},
    optional={
        "index": st.one_of(st.integers(0, 3), json_scalars),
        "delta": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "content": st.one_of(short_text, json_scalars),
                    "refusal": short_text,
                    "reasoning": short_text,
                    "tool_calls": st.lists(
                        st.fixed_dictionaries({"function": st.fixed_dictionaries({"arguments": json_scalars})})
                    ),
                },
            ),
            json_values,
        ),
        "text": st.one_of(short_text, json_scalars),
        "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length", "error"]), json_scalars),
    },
)
chat_chunks = st.fixed_dictionaries(
    {},
    optional={
        "model": models,
        "choices": st.one_of(st.lists(_chat_choice, max_size=3), st.just([]), json_values),
        "usage": st.one_of(st.none(), chat_usage, json_values),
        "error": st.one_of(st.none(), errors),
    },
)
anthropic_events = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("message_start"),
            "message": st.one_of(
                st.fixed_dictionaries({}, optional={"model": models, "usage": st.one_of(anthropic_usage, json_values)}),
                json_values,
            ),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("content_block_delta")},
        optional={
            "delta": st.one_of(
                st.fixed_dictionaries(
                    {}, optional={"text": json_scalars, "partial_json": short_text, "thinking": short_text}
                ),
                json_values,
            )
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("message_delta")}, optional={"usage": st.one_of(anthropic_usage, json_values)}
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["message_stop", "ping", "content_block_stop"])}),
    st.fixed_dictionaries({"type": st.just("error")}, optional={"error": errors}),
    json_objects,
)
responses_events = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["response.completed", "response.incomplete", "response.failed"])},
        optional={
            "response": st.one_of(
                st.fixed_dictionaries(
                    {}, optional={"usage": st.one_of(responses_usage, json_values), "model": models, "error": errors}
                ),
                json_values,
            )
        },
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["response.output_text.delta", "response.audio.delta", "x.delta"])},
        optional={"delta": json_scalars},
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["response.created", "response.in_progress"])},
        optional={"response": st.one_of(st.fixed_dictionaries({}, optional={"model": models}), json_values)},
    ),
    st.fixed_dictionaries({"type": st.just("error")}, optional={"message": json_scalars, "code": json_scalars}),
    json_objects,
)
EVENT_NAMES = (None, None, None, "message_start", "message_delta", "message_stop", "content_block_delta", "error")
EVENT_NAMES += ("response.completed", "response.output_text.delta", "ping", "", "é")

# One SSE event before framing: (event name or None, data bytes, extra lines such as comments or ids).
sse_event_data = st.one_of(
    chat_chunks.map(dumps),
    anthropic_events.map(dumps),
    responses_events.map(dumps),
    json_values.map(dumps),
    st.sampled_from([b"[DONE]", b"", b"{", b"null", b"[]", b'"x"', b"data: nested"]),
    st.binary(max_size=32),
)
sse_events = st.tuples(
    st.sampled_from(EVENT_NAMES),
    sse_event_data,
    st.lists(st.sampled_from([b": keep-alive", b"id: 7", b"retry: 100", b"data", b":", b"event:"]), max_size=2),
)
line_endings = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def sse_streams(draw, max_events: int = 8) -> bytes:
    """A provider's stream: events with any data, mixed line endings, comments, multi-line data,
    stray blank lines, and sometimes no final blank line."""
    out = bytearray()
    if draw(st.integers(0, 20)) == 0:
        out += b"\xef\xbb\xbf"
    for name, data, extra in draw(st.lists(sse_events, max_size=max_events)):
        end = draw(line_endings)
        lines = [*extra]
        if name is not None:
            lines.append(b"event: " + name.encode())
        # A data field may not hold a line break: split the payload into data lines, as the spec does.
        for part in data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
            lines.append(b"data: " + part)
        out += end.join(lines) + end + end
    if draw(st.booleans()) and out:
        out = out[: -draw(st.integers(0, min(len(out), 3)))] or out
    return bytes(out)


@st.composite
def chunkings(draw, data: bytes) -> list[bytes]:
    """`data` cut at arbitrary points (empty chunks included): the stream as the network delivers it."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


response_bodies = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={"usage": any_usage, "model": models, "error": st.one_of(st.none(), errors), "choices": json_values},
    ).map(dumps),
    mutated_bytes(st.fixed_dictionaries({"usage": any_usage, "model": models}).map(dumps)),
    json_values.map(dumps),
    st.binary(max_size=48),
)


# --- a fast mutator: cheap variants of each generated input -------------------------------------------

# Byte strings a mutation inserts: JSON and SSE syntax, field names, numbers at the bounds.
TOKENS = (
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b"-",
    b"1e999",
    b"0.5",
    b"\n\n",
    b"\r\n\r\n",
    b"\r",
    b"data: ",
    b"event: error\n",
    b"[DONE]",
    b"\xff",
    b"\xc3",
    b"\xef\xbb\xbf",
    *(b'"' + name.encode() + b'":' for name in FIELD_NAMES),
    *(str(n).encode() for n in EDGE_INTS),
)


def mutate_bytes(data: bytes, rng) -> bytes:
    """One to four byte-level edits: flip, insert a token, delete a span, duplicate a span, truncate."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(out))
        op = rng.randrange(6)
        if op == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif op in (1, 2):
            out[at:at] = TOKENS[rng.randrange(len(TOKENS))]
        elif op == 3:
            del out[at : at + rng.randint(1, 16)]
        elif op == 4 and out:
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randint(1, 32)]
        else:
            del out[at:]
    return bytes(out)


def rechunk(data: bytes, rng) -> list[bytes]:
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# Values a structural mutation sets a request field to.
MUTANT_VALUES = (
    None,
    True,
    False,
    "",
    "x",
    "gpt-4o-mini",
    "claude-test",
    "h-chat",
    "mock-free",
    [],
    {},
    [{}],
    [None],
    {"include_usage": True},
    [{"type": "web_search"}],
    [{"type": "image_url", "image_url": "http://x"}],
    [{"type": "input_audio"}],
    ["audio"],
    [{"id": "web"}],
    *EDGE_INTS,
    0.5,
    -0.0,
    "1" * 300,
)


def mutate_payload(payload: dict, rng) -> dict:
    """Set, remove or nest one to three fields (top level or inside a first list item)."""
    out = dict(payload)
    for _ in range(rng.randint(1, 3)):
        name = FIELD_NAMES[rng.randrange(len(FIELD_NAMES))]
        op = rng.randrange(4)
        if op == 0:
            out.pop(name, None)
        elif op == 1 and isinstance(out.get("messages"), list) and out["messages"]:
            first = out["messages"][0]
            item = dict(first) if isinstance(first, dict) else {}
            item[name] = MUTANT_VALUES[rng.randrange(len(MUTANT_VALUES))]
            out["messages"] = [item, *out["messages"][1:]]
        else:
            out[name] = MUTANT_VALUES[rng.randrange(len(MUTANT_VALUES))]
    return out
