"""The pure fuzz targets: every protocol's request reader and rewriter, its body and stream readers, the
SSE framer, the error envelopes, the admin input checks and the secret scrubber, in process, fast.

Each `check_*` takes one generated input and asserts the target's properties; `make_test` turns one into
a hypothesis test with a given number of examples (tests/fuzz/ runs them big, the smoke test small).
"""

from __future__ import annotations

import json
import random
import re
import time

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sidecar import scrub
from sidecar.control.http import AdminError, bounded_int, valid_id, valid_name
from sidecar.money import MoneyError, format_micro, parse_credits
from sidecar.pricing import CostProfile, ModelPrice, TokenPrices, Usage
from sidecar.protocols import ALL as PROTOCOLS
from sidecar.protocols.base import (
    CHOICES_MAX,
    OPENROUTER_ONLY_FIELDS,
    OUTPUT_TOKENS_MAX,
    Protocol,
    RequestFacts,
    parse_json,
)
from sidecar.protocols.errors import KINDS, SidecarError
from sidecar.protocols.openai_completions import PROMPTS_MAX
from sidecar.serving import protocol_error_body
from sidecar.sse import SSEError, SSEFramer
from support.fuzz_inputs import (
    chunkings,
    dumps,
    json_values,
    mutate_bytes,
    mutate_payload,
    rechunk,
    request_bytes,
    request_payloads,
    response_bodies,
    sse_streams,
)
from support.fuzz_report import MUTANTS, target

STREAMING = tuple(p for p in PROTOCOLS if p.has_output)  # embeddings are never streamed
_PRICES = TokenPrices(input=5_000, output=25_000, cache_read=500, cache_write_5m=6_250, cache_write_1h=10_000)
PROFILE = CostProfile("fuzz", "USD", 0, {"m": ModelPrice("m", _PRICES, _PRICES)})
UPSTREAM_MODEL = "upstream-model-x"


# --- the protocol's envelope (shared with the HTTP targets) ------------------------------------------


def assert_envelope(protocol: Protocol, body: bytes) -> dict:
    """`body` is an error in `protocol`'s envelope; returns the inner error object."""
    payload = orjson.loads(body)
    if protocol.family == "anthropic":
        assert payload.get("type") == "error", payload
        inner = payload["error"]
        assert isinstance(inner.get("type"), str) and isinstance(inner.get("message"), str), payload
        return inner
    inner = payload["error"]
    assert {"message", "type", "param", "code"} <= set(inner), payload
    assert isinstance(inner["message"], str) and isinstance(inner["type"], str), payload
    return inner


def assert_client_error(protocol: Protocol, error: SidecarError) -> None:
    assert 400 <= error.status < 500, f"request input led to {error.status} ({error.kind}): {error.message}"
    assert_envelope(protocol, protocol.error_body(error))


# --- requests ------------------------------------------------------------------------------------------


def check_request_bytes(body: bytes) -> int:
    """Raw request bytes through parse_json then every protocol. Returns the calls driven."""
    try:
        payload = parse_json(body)
    except SidecarError as error:
        for protocol in PROTOCOLS:
            assert_client_error(protocol, error)
        return 1
    return 1 + sum(check_payload(protocol, payload) for protocol in PROTOCOLS)


def check_request_payload(payload: dict) -> int:
    return check_request_bytes(dumps(payload))


def check_payload(protocol: Protocol, payload: dict) -> int:
    """read_request raises nothing but a 4xx SidecarError; what it accepts rewrites to JSON that
    names the upstream model and carries one real output cap."""
    try:
        facts = protocol.read_request(payload)
    except SidecarError as error:
        assert_client_error(protocol, error)
        return 1
    assert_facts(protocol, facts)
    cap = facts.max_output_tokens or 100
    for to_openrouter in (False, True):
        out = orjson.loads(protocol.rewrite_request(payload, facts, UPSTREAM_MODEL, cap, to_openrouter))
        assert isinstance(out, dict) and out["model"] == UPSTREAM_MODEL
        sent = [name for name in protocol.cap_fields if name in out]
        assert all(out[name] == cap for name in sent), (out, cap)
        if protocol.cap_field:
            assert sent, f"{protocol.name}: no output cap sent upstream"
        if not to_openrouter:
            assert not set(OPENROUTER_ONLY_FIELDS) & set(out), out
        if facts.stream and protocol.name in ("openai_chat", "openai_completions"):
            assert out["stream_options"]["include_usage"] is True
    return 3


def assert_facts(protocol: Protocol, facts: RequestFacts) -> None:
    assert isinstance(facts.model, str) and facts.model
    assert isinstance(facts.stream, bool)
    assert facts.max_output_tokens is None or (
        type(facts.max_output_tokens) is int and 1 <= facts.max_output_tokens <= OUTPUT_TOKENS_MAX
    )
    assert type(facts.choices) is int and 1 <= facts.choices <= CHOICES_MAX * PROMPTS_MAX
    if protocol.name == "openai_embeddings":
        assert not facts.stream
    if protocol.name == "anthropic_messages":
        assert facts.max_output_tokens is not None


# --- provider answers ----------------------------------------------------------------------------------


def check_read_body(body: bytes) -> int:
    for protocol in PROTOCOLS:
        facts = protocol.read_body(body)
        assert_usage(facts.usage)
        assert facts.model is None or (isinstance(facts.model, str) and facts.model)
        assert facts.error is None or (isinstance(facts.error, str) and len(facts.error) <= 500)
    return len(PROTOCOLS)


def assert_usage(usage: Usage | None) -> None:
    if usage is None:
        return
    assert isinstance(usage, Usage)  # its constructor checks every count is a non-negative int
    cost = PROFILE.cost_micro(PROFILE.models["m"], usage)
    assert type(cost) is int and cost >= 0


def _reader_state(reader, request_bytes: int) -> tuple:
    observed, estimated = reader.observed(request_bytes)
    assert_usage(observed)
    assert isinstance(estimated, bool)
    return (
        reader.usage,
        reader.error,
        reader.done,
        reader.content_chars,
        reader.model,
        reader.has_final_usage,
        observed,
    )


def read_stream(protocol: Protocol, facts: RequestFacts, chunks: list[bytes]) -> tuple[tuple, list[bytes]]:
    """Frame `chunks` and observe every event as the relay does; (the reader's state, relayed raws)."""
    framer, reader = SSEFramer(), protocol.stream_reader(facts)
    relayed = []
    events = [event for chunk in chunks for event in framer.feed(chunk)]
    tail = framer.flush()
    events += [tail] if tail is not None else []
    for event in events:
        shown = reader.observe(event)
        assert isinstance(shown, bool)
        if shown:
            relayed.append(event.raw)
        elif protocol.name in ("openai_chat", "openai_completions"):
            # Only the usage chunk the sidecar asked for on the client's behalf is ever hidden.
            chunk = orjson.loads(event.data)
            assert chunk.get("choices") == [] and chunk.get("usage") is not None and not facts.client_wants_usage
        else:
            raise AssertionError(f"{protocol.name} hid an event: {event.raw!r}")
        assert reader.error is None or (isinstance(reader.error, str) and len(reader.error) <= 500)
        assert reader.model is None or (isinstance(reader.model, str) and reader.model)
    return _reader_state(reader, 1000), relayed


@st.composite
def stream_cases(draw):
    protocol = draw(st.sampled_from(STREAMING))
    stream = draw(sse_streams())
    facts = RequestFacts(
        model="m",
        stream=True,
        max_output_tokens=draw(st.one_of(st.none(), st.integers(1, 100))),
        choices=draw(st.integers(1, 3)),
        client_wants_usage=draw(st.booleans()),
    )
    return protocol, facts, stream, draw(chunkings(stream))


def check_stream(case) -> int:
    """Readers never raise; what they read does not depend on how the network cut the stream."""
    protocol, facts, stream, chunks = case
    state, relayed = read_stream(protocol, facts, chunks)
    whole_state, whole_relayed = read_stream(protocol, facts, [stream])
    assert state == whole_state, (state, whole_state)
    assert relayed == whole_relayed
    return 2


@st.composite
def framer_cases(draw):
    data = draw(st.one_of(st.binary(max_size=200), sse_streams(max_events=4)))
    limit = draw(st.one_of(st.just(4 * 1024 * 1024), st.integers(1, 64)))
    return data, draw(chunkings(data)), limit


def _frame(chunks: list[bytes], limit: int) -> list | None:
    framer = SSEFramer(max_event_bytes=limit)
    try:
        events = [event for chunk in chunks for event in framer.feed(chunk)]
    except SSEError:
        return None
    tail = framer.flush()
    return events + ([tail] if tail is not None else [])


def check_framer(case) -> int:
    """Any bytes, any chunking: every byte lands in exactly one event's raw, events do not depend on
    the chunking, and the only error is SSEError (an event over the bound)."""
    data, chunks, limit = case
    events = _frame(chunks, limit)
    whole = _frame([data], limit)
    if events is not None:
        assert b"".join(e.raw for e in events) == data
        if whole is not None:
            assert events == whole
    return 2


# --- envelopes, headers, admin input, scrubbing ----------------------------------------------------------

header_text = st.one_of(
    st.text(max_size=40), st.binary(max_size=30).map(lambda b: b.decode("utf-8", "surrogateescape"))
)


@st.composite
def envelope_cases(draw):
    return (
        draw(st.sampled_from(sorted(KINDS))),
        draw(st.text(max_size=60)),
        draw(st.one_of(st.none(), st.text(max_size=20))),
        draw(st.one_of(st.none(), st.text(max_size=20))),
        draw(st.lists(header_text, max_size=3)),
    )


class _Headers(dict):
    """A header mapping with multidict's getall, as aiohttp's request headers have."""

    def __init__(self, values: list[str]) -> None:
        super().__init__({"anthropic-beta": values[0]} if values else {})
        self._values = values

    def getall(self, name, default=()):
        return self._values if name == "anthropic-beta" and self._values else default


def check_envelope(case) -> int:
    """Every error renders in every protocol's envelope; header checks raise only a 4xx SidecarError."""
    kind, message, code, param, betas = case
    error = SidecarError(kind, message, code=code, param=param)
    for protocol in PROTOCOLS:
        inner = assert_envelope(protocol, protocol.error_body(error))
        assert inner["message"] == message
        event = protocol.stream_error(message)
        assert event.endswith(b"\n\n")
        try:
            protocol.check_headers(_Headers(betas))
        except SidecarError as refused:
            assert_client_error(protocol, refused)
        assert isinstance(protocol.long_context(_Headers(betas)), bool)
        key = protocol.client_key({"Authorization": betas[0] if betas else "", "x-api-key": message})
        assert key is None or isinstance(key, str)
    for status in (400, 401, 404, 405, 408, 413, 429, 503):
        orjson.loads(protocol_error_body(betas[0] if betas else None, status, message, code or "x"))
    return len(PROTOCOLS) * 4 + 8


admin_values = st.one_of(json_values, st.text(max_size=80), st.sampled_from(["ws_a\n", "a" * 64, "a" * 65, "x\x00y"]))


def check_admin_input(value) -> int:
    """The admin API's checks refuse with AdminError (400) or MoneyError, never anything else."""
    driven = 0
    for check in (
        lambda v: valid_id(v, "id"),
        lambda v: valid_name(v, "default"),
        lambda v: bounded_int(v, "n", 1, 2**31 - 1, "invalid"),
    ):
        driven += 1
        try:
            result = check(value)
        except AdminError as error:
            assert error.status == 400
            continue
        if isinstance(result, str):
            assert result.isprintable() and "\n" not in result and "\x00" not in result
    driven += 1
    try:
        amount = parse_credits(value)
    except MoneyError:
        return driven
    assert type(amount) is int
    format_micro(amount)
    return driven


# Keys as providers and customers spell them, and any printable text without `"` or `\\`: the
# scrubber matches a secret's raw and \\uXXXX spellings, not JSON's short escapes `\\"` and `\\\\`, so a
# key holding either is refused when it is stored (control/byok.py), and no other credential holds one.
_SCRUBBABLE = st.characters(exclude_characters='"\\', exclude_categories=("Cs", "Cc", "Zl", "Zp"))
secrets_text = st.one_of(
    st.from_regex(r"sk-[A-Za-z0-9_\-]{8,40}", fullmatch=True),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"\\'), min_size=8),
    st.text(alphabet=_SCRUBBABLE, min_size=8, max_size=30).filter(str.isprintable),
)
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\(.)")


@st.composite
def scrub_cases(draw):
    secret = draw(secrets_text)
    text = draw(st.text(max_size=30)) + secret + draw(st.text(max_size=30))
    spelling = draw(st.sampled_from(["orjson", "ascii", "escape-some", "slashes"]))
    if spelling == "orjson":
        body = orjson.dumps({"error": {"message": text}})
    elif spelling == "ascii":
        body = json.dumps({"error": {"message": text}}, ensure_ascii=True).encode()
    elif spelling == "slashes":
        body = json.dumps({"message": text}).replace("/", "\\/").encode()
    else:  # a provider that escapes arbitrary characters of the key
        picks = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
        inner = "".join(
            f"\\u{ord(c):04x}" if pick and ord(c) <= 0xFFFF else json.dumps(c)[1:-1]
            for c, pick in zip(text, picks, strict=True)
        )
        body = ('{"message": "' + inner + '"}').encode("utf-8", "surrogatepass")
    return secret, body


def _unescape_leniently(body: bytes) -> str:
    """JSON string escapes decoded wherever they are, even in a body that is no longer valid JSON."""
    text = body.decode("utf-8", "replace")
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)) if m.group(1) else m.group(2), text)


def check_scrub(case) -> int:
    """A secret quoted in a JSON body, however the JSON spells it, is gone once the body is scrubbed:
    what the relay sends a client never carries the key. (The scrubbed body may stop being valid JSON
    when a secret starts with hex digits right after a \\uXXXX escape: counted, reported in docs/fuzz.md.)"""
    secret, body = case
    scrubbed = scrub.Scrubber([secret]).bytes(body)
    # A "secret" that is part of the marker itself (say "[REDACTE") is found in the marker: not a leak.
    assert secret not in _unescape_leniently(scrubbed).replace(scrub.REDACTED, ""), (secret, body, scrubbed)
    try:
        orjson.loads(scrubbed)
    except orjson.JSONDecodeError:
        target("scrubber").notes["scrubbed body no longer JSON"] += 1
    return 1


# --- the targets -------------------------------------------------------------------------------------------


def _mutate_stream(case, rng):
    protocol, facts, stream, _ = case
    mutated = mutate_bytes(stream, rng)
    return protocol, facts, mutated, rechunk(mutated, rng)


def _mutate_framed(case, rng):
    data, _, limit = case
    mutated = mutate_bytes(data, rng)
    return mutated, rechunk(mutated, rng), limit


# name -> (strategy of generated inputs, the check, a mutator deriving cheap variants or None)
TARGETS = {
    "request_bytes": (request_bytes, check_request_bytes, mutate_bytes),
    "request_payloads": (request_payloads(), check_request_payload, mutate_payload),
    "read_body": (response_bodies, check_read_body, mutate_bytes),
    "stream_readers": (stream_cases(), check_stream, _mutate_stream),
    "sse_framer": (framer_cases(), check_framer, _mutate_framed),
    "envelopes_and_headers": (envelope_cases(), check_envelope, None),
    "admin_input": (admin_values, check_admin_input, None),
    "scrubber": (scrub_cases(), check_scrub, None),
}


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )


def make_test(name: str, examples: int, mutants: int = MUTANTS):
    """A test running target `name` on `examples` generated inputs, each followed by `mutants` cheap
    variants of it (targets with a mutator), counting them and its time in fuzz_report."""
    strategy, check, mutator = TARGETS[name]
    mutants = mutants if mutator is not None else 0

    @fuzz_settings(examples)
    @given(strategy, st.integers(0, 2**32 - 1))
    def one(value, seed: int) -> None:
        record = target(name)
        record.calls += check(value)
        record.inputs += 1
        record.generated += 1
        rng = random.Random(seed)
        for _ in range(mutants):
            variant = mutator(value, rng)
            try:
                record.calls += check(variant)
            except Exception as exc:
                raise AssertionError(f"{name}: a mutant of the generated input failed: {variant!r}") from exc
            record.inputs += 1

    def test() -> None:
        started = time.perf_counter()
        try:
            one()
        finally:
            target(name).seconds += time.perf_counter() - started

    test.__name__ = f"test_fuzz_{name}"
    return test
