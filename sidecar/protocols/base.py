"""What every wire protocol module provides, and the pieces they share.

A protocol is pure: request JSON in, facts and a rewritten body out; response bytes or SSE events
in, usage out. The request handler owns all I/O and drives any protocol through this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from sidecar.pricing import CostProfile, ModelPrice, Reach, Usage
from sidecar.protocols.errors import SidecarError
from sidecar.sse import SSEEvent

# Request fields only OpenRouter understands; real OpenAI answers 400 to them, so they are removed
# before a call goes to any other provider.
OPENROUTER_ONLY_FIELDS = ("usage", "provider", "models", "route", "transforms", "plugins")
# OpenRouter fields with which a client chooses what serves the call (another model, another provider,
# a plugin with its own fee): refused unless the model's config allow-lists them.
ROUTING_FIELDS = ("models", "route", "provider", "plugins")
ROUTING_MODELS_MAX = 8


@dataclass(frozen=True, slots=True)
class RequestFacts:
    model: str
    stream: bool
    max_output_tokens: int | None  # the client's own cap, if it sent one
    choices: int = 1  # `n`: the output cap applies to each choice
    client_wants_usage: bool = False  # OpenAI streams: the client itself asked for the usage chunk
    # True when the input's tokens are not bounded by the body's bytes (media, server-side context,
    # server tools, plugins): the hold then assumes the model's whole context window.
    input_unbounded: bool = False
    routing_fields: tuple[str, ...] = ()  # the ROUTING_FIELDS the client sent
    routing_models: tuple[str, ...] = ()  # OpenRouter's `models`: any of them may serve the call
    # The priced classes beyond text the call may incur (audio, images, server-tool calls): the hold
    # includes them, and a target whose price has none for one of them cannot serve the call.
    reach: Reach = field(default_factory=Reach)
    # Server-tool calls billed even when the usage does not count them (chat's `web_search_options`:
    # one search per call).
    implied_web_searches: int = 0


@dataclass(frozen=True, slots=True)
class BodyFacts:
    usage: Usage | None
    model: str | None  # the model that actually served the call, when the response names it
    error: str | None = None  # an error inside a 200 body (OpenRouter reports late failures so)


class StreamReader:
    """Reads a stream on the side while it is relayed. `observe` returns False for an event the
    client must not see (the usage chunk the sidecar asked for on the client's behalf). It never
    raises on what a provider sends: a malformed event is a provider error or missing usage."""

    __slots__ = ("content_chars", "done", "error", "model", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None  # the provider's latest readable count, None when missing
        self.error: str | None = None  # the provider reported an error (mid-stream or terminal)
        self.done = False  # the protocol's end-of-stream marker arrived
        self.content_chars = 0  # UTF-8 bytes of the output text relayed, for estimates
        self.model: str | None = None

    def observe(self, event: SSEEvent) -> bool:
        raise NotImplementedError

    @property
    def has_final_usage(self) -> bool:
        """The provider's own count for the whole call has arrived: reading on cannot change the bill
        (a relay that lost its client may stop reading the upstream here)."""
        return self.usage is not None and self.done

    def observed(self, request_bytes: int) -> tuple[Usage, bool]:
        """What was used so far, and whether it is an estimate: the provider's usage when it sent
        one, else input estimated from the request and output from the text relayed."""
        if self.has_final_usage:
            return self.usage, False
        return Usage(
            input_tokens=estimate_tokens(request_bytes), output_tokens=estimate_tokens(self.content_chars)
        ), True


class Protocol:
    name: str
    route: str  # the sidecar's route
    upstream_path: str  # appended to the provider's base URL
    family: str  # "openai" or "anthropic": which providers can serve it
    operation = "chat"  # gen_ai.operation.name (OpenTelemetry GenAI conventions): in spans and gen_ai_* metrics
    has_output = True  # False for embeddings: input-only pricing, no output cap
    cap_field: str | None = None  # injected when the client sent no output cap
    cap_fields: tuple[str, ...] = ()  # every field a provider may read as the output cap
    search_bound: SearchBound | None = None  # how server search calls are bounded (None: refused)

    def read_request(self, payload: dict) -> RequestFacts:
        raise NotImplementedError

    def rewrite_request(
        self, payload: dict, facts: RequestFacts, upstream_model: str, output_cap: int, to_openrouter: bool
    ) -> bytes:
        """The body sent upstream: the provider's model id and a real output cap."""
        return orjson.dumps(self.rewrite_payload(payload, facts, upstream_model, output_cap, to_openrouter))

    def rewrite_payload(
        self, payload: dict, facts: RequestFacts, upstream_model: str, output_cap: int, to_openrouter: bool
    ) -> dict:
        out = dict(payload)
        out["model"] = upstream_model
        # Every cap field the client sent is set to the one cap the hold was priced with: a provider
        # that reads another field than we did must not generate past the ceiling.
        sent = [name for name in self.cap_fields if name in out]
        for name in sent:
            out[name] = output_cap
        if self.cap_field and not sent:
            out[self.cap_field] = output_cap
        if not to_openrouter:
            for name in OPENROUTER_ONLY_FIELDS:
                out.pop(name, None)
        if self.search_bound is not None:
            out = self.search_bound.bound_payload(out)
        return out

    def long_context(self, headers) -> bool:
        """The request opts in to a context window beyond the model's usual one (Anthropic's 1M beta)."""
        return False

    def check_headers(self, headers) -> None:
        """Refuse request headers that turn on features the cost profile cannot price."""

    def read_body(self, body: bytes) -> BodyFacts:
        raise NotImplementedError

    def stream_reader(self, facts: RequestFacts) -> StreamReader:
        raise NotImplementedError

    def error_body(self, error: SidecarError) -> bytes:
        raise NotImplementedError

    def stream_error(self, message: str) -> bytes:
        """An SSE event telling a client, mid-stream, that the provider's stream broke off."""
        raise NotImplementedError

    def client_key(self, headers) -> str | None:
        return bearer_token(headers.get("Authorization"))


def bearer_token(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


def parse_json(body: bytes) -> dict:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SidecarError("invalid_request", f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise SidecarError("invalid_request", "request body must be a JSON object")
    return payload


def loads_object(data: bytes) -> dict | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# Bounds on the request's numbers the hold is computed from: far above any real model's limits, far
# below what would overflow the money arithmetic or the JSON encoder (orjson stops at 2^64).
OUTPUT_TOKENS_MAX = 1_000_000_000
CHOICES_MAX = 128


def positive_int(payload: dict, name: str, maximum: int = OUTPUT_TOKENS_MAX) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise SidecarError("invalid_request", f"'{name}' must be an integer between 1 and {maximum}", param=name)
    return value


def require_model(payload: dict) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise SidecarError("invalid_request", "you must provide a model parameter", param="model")
    return model


def require_stream_flag(payload: dict) -> bool:
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise SidecarError("invalid_request", "'stream' must be a boolean", param="stream")
    return stream


TOKEN_COUNT_MAX = 10**12  # no call uses more; a larger count from a provider is nonsense, clamped


def count(value: object) -> int | None:
    """A token count from a provider, or None when it is not one. Strict: only a JSON integer >= 0
    is a count; a float, a string, a bool, a negative number or an absent field means the provider's
    usage is missing (so the call is estimated), never 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, TOKEN_COUNT_MAX)
    return None


def optional_count(value: object) -> int | None:
    """A count the provider may leave out (a detail such as cached tokens): absent or null is 0,
    anything else must be a count."""
    return 0 if value is None else count(value)


def optional_object(value: object) -> dict | None:
    """A nested usage object the provider may leave out: absent or null is {}, a non-object is None."""
    if value is None:
        return {}
    return value if isinstance(value, dict) else None


def estimate_tokens(chars: int) -> int:
    """~4 bytes per token: the usual rule of thumb for English text with BPE tokenizers."""
    return -(-chars // 4)


def text_bytes(value: object) -> int:
    """The UTF-8 size of a streamed text fragment (0 for anything that is not a string): output
    estimates are read from the parsed event, so JSON spacing and escapes do not change them."""
    return len(value.encode("utf-8", "replace")) if isinstance(value, str) else 0


def error_text(value: object, default: str = "error") -> str:
    """A provider's error, whatever its shape (an object with a message, a string, anything), bounded."""
    if isinstance(value, dict):
        value = value.get("message") or value.get("type") or value.get("code") or value
    return str(value or default)[:500]


# --- what the request lets the provider do beyond its bytes (issue 15.11, 15.14, 15.4) -------------------

# Content parts, by key or by `type`, whose tokens are not bounded by their bytes (an image URL is a few
# bytes and hundreds of tokens, a file id a whole PDF), in every protocol's shape: OpenAI chat
# (image_url, file), Responses (input_image, input_file, item_reference), Anthropic (image, document,
# container_upload, search results by file).
_MEDIA_KEYS = frozenset(
    {"image_url", "input_image", "input_file", "file_id", "file_data", "file_url", "video_url", "input_video"}
)
_MEDIA_TYPES = frozenset(
    {
        "image",
        "image_url",
        "input_image",
        "file",
        "input_file",
        "document",
        "video",
        "video_url",
        "input_video",
        "container_upload",
        "item_reference",  # a Responses input item stored server-side
    }
)
# Audio is priced per audio token: allowed only on a target whose price has an audio class (handler).
_AUDIO_KEYS = frozenset({"input_audio", "audio", "audio_url"})
_AUDIO_TYPES = frozenset({"input_audio", "audio", "audio_url", "output_audio"})
# Subtrees that describe data rather than carry it (JSON schemas of tools and formats, metadata): a
# property named "image_url" in a tool's schema is not an image.
_DESCRIPTIVE_KEYS = frozenset({"parameters", "input_schema", "schema", "json_schema", "metadata"})
# Server tools with a fee of their own the cost profile cannot express (per container, per generated
# image): refused. Web and file search are priced per call (the catalog's search fees) and bounded: by the
# tool's `max_uses` (Anthropic) or the call's `max_tool_calls` (Responses), injected when absent. Any other
# non-client tool runs server-side with input the body does not bound (web fetch, MCP, computer use
# screenshots): the input is held at the window.
_FEE_TOOL_PREFIXES = ("code_interpreter", "code_execution", "image_generation")
_WEB_SEARCH_PREFIX = "web_search"
_FILE_SEARCH_PREFIX = "file_search"
# The most server-tool calls a call may make when the client set no bound: injected upstream, so the
# hold's search fees are a real worst case.
TOOL_CALLS_MAX_DEFAULT = 5
TOOL_CALLS_MAX = 1_000
_CLIENT_TOOL_TYPES = frozenset({"function", "custom"})
# OpenRouter plugins with a fee of their own (issue 15.14).
_FEE_PLUGINS = frozenset({"web"})
_FEE_PDF_ENGINES = frozenset({"mistral-ocr"})
_PRICED_SERVICE_TIERS = frozenset({"auto", "default", "flex", "standard_only"})
_WALK_NODES_MAX = 1_000_000  # the body is at most server.body_bytes_max; this only bounds the loop


def unpriced(feature: str, param: str) -> SidecarError:
    return SidecarError(
        "invalid_request",
        f"{feature} is not supported by this gateway: its price cannot be metered",
        code="unsupported_feature",
        param=param,
    )


def media_of(payload: dict) -> tuple[bool, str | None]:
    """Walk the parsed request (so escaped or spaced keys are seen as what they are) for media parts:
    (whether there is any media part, the key or type that names audio, if any), the whole request walked."""
    # Top-level `audio` (chat) configures audio OUTPUT (voice, format): not input; see wants_audio_output.
    stack: list[object] = [{k: v for k, v in payload.items() if k != "audio"}]
    media, audio = False, None
    for _ in range(_WALK_NODES_MAX):
        if not stack:
            return media, audio
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, dict | list))
            continue
        for key, value in node.items():  # only dicts and lists are ever pushed
            if key in _DESCRIPTIVE_KEYS or value is None:
                continue
            kind = value if key == "type" and isinstance(value, str) else None
            if key in _AUDIO_KEYS or kind in _AUDIO_TYPES:
                audio = audio or kind or key
            if key in _MEDIA_KEYS or kind in _MEDIA_TYPES:
                media = True
            if isinstance(value, dict | list):
                stack.append(value)
    raise SidecarError("invalid_request", "the request body is nested too deeply or has too many parts")


@dataclass(frozen=True, slots=True)
class ServerTools:
    present: bool = False  # any server tool: its input is not bounded by the body
    web_search: bool = False
    file_search: bool = False
    uses_max: int = 0  # the sum of the search tools' own `max_uses` (Anthropic)
    unbounded: int = 0  # search tools without their own `max_uses`


def server_tools_of(payload: dict) -> ServerTools:
    """The server tools of the request; refuses those with a fee the cost profile cannot express."""
    tools = payload.get("tools")
    if not isinstance(tools, list):
        return ServerTools()
    found = ServerTools()
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind is None or (isinstance(kind, str) and kind in _CLIENT_TOOL_TYPES):
            continue
        if not isinstance(kind, str) or kind.startswith(_FEE_TOOL_PREFIXES):
            raise unpriced(f"the server tool {str(kind)[:60]!r}", "tools")
        web, file = kind.startswith(_WEB_SEARCH_PREFIX), kind.startswith(_FILE_SEARCH_PREFIX)
        uses = positive_int(tool, "max_uses", TOOL_CALLS_MAX) if web or file else None
        found = ServerTools(
            present=True,
            web_search=found.web_search or web,
            file_search=found.file_search or file,
            uses_max=found.uses_max + (uses or 0),
            unbounded=found.unbounded + ((web or file) and uses is None),
        )
    return found


class SearchBound:
    """How a protocol bounds the server search calls of one call, so the hold's search fees are a real
    worst case: each bound the client left out is injected upstream (`bound_payload`)."""

    def searches_max(self, payload: dict, tools: ServerTools) -> int:
        raise NotImplementedError

    def bound_payload(self, payload: dict) -> dict:
        raise NotImplementedError


class PerCallBound(SearchBound):
    """OpenAI Responses: `max_tool_calls` bounds every built-in tool call of the response."""

    def searches_max(self, payload: dict, tools: ServerTools) -> int:
        return positive_int(payload, "max_tool_calls", TOOL_CALLS_MAX) or TOOL_CALLS_MAX_DEFAULT

    def bound_payload(self, payload: dict) -> dict:
        tools = server_tools_of(payload)
        if (tools.web_search or tools.file_search) and payload.get("max_tool_calls") is None:
            return {**payload, "max_tool_calls": TOOL_CALLS_MAX_DEFAULT}
        return payload


class PerToolBound(SearchBound):
    """Anthropic: each search tool's own `max_uses`."""

    def searches_max(self, payload: dict, tools: ServerTools) -> int:
        return tools.uses_max + tools.unbounded * TOOL_CALLS_MAX_DEFAULT

    def bound_payload(self, payload: dict) -> dict:
        tools = payload.get("tools")
        if not isinstance(tools, list):
            return payload
        bounded = [
            {**tool, "max_uses": TOOL_CALLS_MAX_DEFAULT}
            if isinstance(tool, dict)
            and isinstance(tool.get("type"), str)
            and tool["type"].startswith((_WEB_SEARCH_PREFIX, _FILE_SEARCH_PREFIX))
            and tool.get("max_uses") is None
            else tool
            for tool in tools
        ]
        return {**payload, "tools": bounded}


def refuse_unpriced_options(payload: dict) -> None:
    """Request options that change the price per token in ways the cost profile cannot express."""
    tier = payload.get("service_tier")
    if tier is not None and not (isinstance(tier, str) and tier in _PRICED_SERVICE_TIERS):
        raise unpriced(f"the service tier {str(tier)[:40]!r}", "service_tier")


def wants_audio_output(payload: dict) -> bool:
    modalities = payload.get("modalities")
    return (isinstance(modalities, list) and "audio" in modalities) or payload.get("audio") is not None


def routing_of(payload: dict) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """OpenRouter routing the client asked for: (the ROUTING_FIELDS sent, the `models` listed, whether
    a plugin makes the input unbounded). Plugins and models with a fee of their own are refused."""
    sent = tuple(name for name in ROUTING_FIELDS if payload.get(name) is not None)
    models: tuple[str, ...] = ()
    if "models" in sent:
        listed = payload["models"]
        if (
            not isinstance(listed, list)
            or not 1 <= len(listed) <= ROUTING_MODELS_MAX
            or not all(isinstance(m, str) and m for m in listed)
        ):
            raise SidecarError(
                "invalid_request",
                f"'models' must be a list of 1 to {ROUTING_MODELS_MAX} model ids",
                param="models",
            )
        if any(m.endswith(":online") for m in listed):
            raise unpriced("web search (a ':online' model)", "models")
        models = tuple(listed)
    plugins = payload.get("plugins")
    if plugins is not None:
        if not isinstance(plugins, list):
            raise SidecarError("invalid_request", "'plugins' must be a list", param="plugins")
        for plugin in plugins:
            plugin_id = plugin.get("id") if isinstance(plugin, dict) else None
            pdf = plugin.get("pdf") if isinstance(plugin, dict) else None
            engine = pdf.get("engine") if isinstance(pdf, dict) else None
            if _named(plugin_id, _FEE_PLUGINS) or _named(engine, _FEE_PDF_ENGINES):
                raise unpriced(f"the plugin {str(plugin_id or engine)[:40]!r}", "plugins")
    return sent, models, bool(plugins)


def _named(value: object, names: frozenset[str]) -> bool:
    return isinstance(value, str) and value in names


def check_routing(facts: RequestFacts, allowed: tuple[str, ...]) -> None:
    """Refuse, naming the field, every routing field the model's config does not allow."""
    for name in facts.routing_fields:
        if name not in allowed:
            raise SidecarError(
                "invalid_request",
                f"'{name}' is not allowed for this model: it could make the provider serve a dearer model "
                "or add fees beyond what the call is priced for",
                code="routing_field_not_allowed",
                param=name,
            )


def routing_prices(facts: RequestFacts, profile: CostProfile, at_ms: int | None = None) -> list[ModelPrice]:
    """The price of every model OpenRouter may serve instead (its `models`); an unpriced one is refused."""
    prices = []
    for name in facts.routing_models:
        price = profile.price_of(name, at_ms)
        if price is None:
            raise SidecarError("invalid_request", f"the model {name[:100]!r} in 'models' has no price", param="models")
        prices.append(price)
    return prices


def request_facts(
    payload: dict,
    model: str,
    stream: bool,
    max_output_tokens: int | None,
    server_context_keys: tuple[str, ...] = (),
    search_bound: SearchBound | None = None,
    **extra,
) -> RequestFacts:
    """The facts every protocol shares, with what makes the input unbounded decided from the parsed
    request. `server_context_keys`: top-level fields that pull input stored at the provider.
    `search_bound`: how this protocol bounds server search calls (None: it has no search tools)."""
    refuse_unpriced_options(payload)
    routing_fields, routing_models, plugins = routing_of(payload)
    server_context = any(payload.get(key) not in (None, False) for key in server_context_keys)
    tools = server_tools_of(payload)
    media, audio = media_of(payload)
    searches = 0
    if tools.web_search or tools.file_search:
        if search_bound is None:
            raise unpriced("a search tool on this route", "tools")
        searches = search_bound.searches_max(payload, tools)
    implied = 1 if payload.get("web_search_options") is not None else 0
    reach = Reach(
        audio_in=audio is not None,
        audio_out=wants_audio_output(payload),
        image_in=media,
        web_searches_max=(searches if tools.web_search else 0) + implied,
        file_searches_max=searches if tools.file_search else 0,
        params=(
            ("audio input", audio or "messages"),
            ("audio output", "modalities"),
            ("web search", "web_search_options" if implied else "tools"),
            ("file search", "tools"),
        ),
    )
    return RequestFacts(
        model=model,
        stream=stream,
        max_output_tokens=max_output_tokens,
        input_unbounded=server_context or tools.present or media or audio is not None or plugins,
        routing_fields=routing_fields,
        routing_models=routing_models,
        reach=reach,
        implied_web_searches=implied,
        **extra,
    )
