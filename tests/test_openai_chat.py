"""The OpenAI Chat Completions protocol module: pure bytes in, facts out."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.pricing import Usage
from sidecar.protocols import openai_common
from sidecar.protocols.base import RequestFacts
from sidecar.protocols.errors import SidecarError, payment_required
from sidecar.protocols.openai_chat import PROTOCOL as chat
from sidecar.sse import SSEFramer

STREAM = (Path(__file__).parent / "fixtures" / "openai_chat_stream.sse").read_bytes()
EXPECTED_USAGE = Usage(input_tokens=176, output_tokens=12, cache_read_tokens=1024, reasoning_tokens=3)


def relay(chunks: list[bytes], client_wants_usage: bool):
    facts = RequestFacts("m", True, None, client_wants_usage=client_wants_usage)
    framer, state, out = SSEFramer(), chat.stream_reader(facts), []
    for chunk in chunks:
        out += [event.raw for event in framer.feed(chunk) if state.observe(event)]
    tail = framer.flush()
    if tail is not None and state.observe(tail):
        out.append(tail.raw)
    return b"".join(out), state


def usage_chunk() -> bytes:
    return next(block + b"\n\n" for block in STREAM.split(b"\n\n") if b'"choices":[]' in block)


@given(st.lists(st.integers(1, len(STREAM) - 1), max_size=30, unique=True))
def test_any_chunking_gives_the_same_usage_and_output(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    hidden, state = relay(chunks, client_wants_usage=False)
    assert state.usage == EXPECTED_USAGE and state.done and state.error is None
    assert hidden == STREAM.replace(usage_chunk(), b""), "only the usage chunk is removed"
    shown, state = relay(chunks, client_wants_usage=True)
    assert shown == STREAM and state.usage == EXPECTED_USAGE


def test_content_is_counted_for_estimates() -> None:
    _, state = relay([STREAM], client_wants_usage=False)
    assert state.content_chars >= len('Hello "world" e')


def test_mid_stream_error_is_seen() -> None:
    events = SSEFramer().feed(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    state = chat.stream_reader(RequestFacts("m", True, None))
    assert state.observe(events[0]) is True
    assert state.error == "overloaded" and state.usage is None


def test_usage_from_a_body() -> None:
    body = orjson.dumps(
        {
            "usage": {
                "prompt_tokens": 19,
                "completion_tokens": 10,
                "total_tokens": 29,
                "prompt_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 5},
                "completion_tokens_details": {"reasoning_tokens": 2},
            }
        }
    )
    assert chat.read_body(body).usage == Usage(
        input_tokens=10, output_tokens=10, cache_read_tokens=4, cache_write_5m_tokens=5, reasoning_tokens=2
    )
    assert chat.read_body(b"not json").usage is None
    assert chat.read_body(b'{"usage": null}').usage is None
    # Nonsense counts never turn into negative, float or zero tokens: the usage is missing (estimated).
    odd = openai_common.usage_from_object(
        {"prompt_tokens": -5, "completion_tokens": 2.5, "prompt_tokens_details": None}
    )
    assert odd is None


def test_rewrite_injects_cap_and_usage_and_keeps_the_rest() -> None:
    payload = {"model": "mini", "messages": [], "stream": True, "temperature": 0.2}
    parsed = chat.read_request(payload)
    out = orjson.loads(chat.rewrite_request(payload, parsed, "gpt-4o-mini", 256, to_openrouter=False))
    assert out == {
        "model": "gpt-4o-mini",
        "messages": [],
        "stream": True,
        "temperature": 0.2,
        "max_completion_tokens": 256,
        "stream_options": {"include_usage": True},
    }
    assert payload["model"] == "mini", "the client's payload is not mutated"
    non_stream = {"model": "m", "messages": [], "max_tokens": 9}
    out = orjson.loads(chat.rewrite_request(non_stream, chat.read_request(non_stream), "m", 9, to_openrouter=False))
    assert out == {"model": "m", "messages": [], "max_tokens": 9}
    # Both caps sent: the hold is priced on the smaller, and every cap upstream is set to it, so a
    # provider reading the other field cannot generate past the ceiling.
    both = {"model": "m", "messages": [], "max_tokens": 1, "max_completion_tokens": 100_000}
    facts = chat.read_request(both)
    assert facts.max_output_tokens == 1
    out = orjson.loads(chat.rewrite_request(both, facts, "m", facts.max_output_tokens, to_openrouter=False))
    assert out["max_tokens"] == out["max_completion_tokens"] == 1
    # OpenRouter-only fields never reach another provider, and do reach OpenRouter.
    routed = {"model": "m", "messages": [], "usage": {"include": True}, "provider": {"order": ["x"]}}
    facts = chat.read_request(routed)
    assert "usage" not in orjson.loads(chat.rewrite_request(routed, facts, "m", 5, to_openrouter=False))
    assert orjson.loads(chat.rewrite_request(routed, facts, "m", 5, to_openrouter=True))["usage"] == {"include": True}


def test_the_402_envelope() -> None:
    body = orjson.loads(chat.error_body(payment_required()))
    assert body["error"]["code"] == "PAYMENT_REQUIRED"
    assert body["error"]["message"] == "insufficient credits"
    assert payment_required().status == 402


@pytest.mark.parametrize(
    "payload",
    [
        {"model": 3, "messages": []},
        {"model": "m", "messages": [], "n": 0},
        {"model": "m", "messages": [], "stream_options": []},
    ],
)
def test_invalid_requests(payload: dict) -> None:
    with pytest.raises(SidecarError) as caught:
        chat.read_request(payload)
    assert caught.value.status == 400
