"""OpenAI embeddings (`POST /v1/embeddings`): never streamed, input-only pricing."""

from __future__ import annotations

from sidecar.pricing import Usage
from sidecar.protocols import openai_common as common
from sidecar.protocols.base import (
    BodyFacts,
    Protocol,
    RequestFacts,
    StreamReader,
    count,
    loads_object,
    request_facts,
    require_model,
)
from sidecar.protocols.errors import SidecarError


def usage_from_object(usage: object) -> Usage | None:
    """`{"prompt_tokens": N, "total_tokens": N}`: input only; None when it is missing or does not parse."""
    if not isinstance(usage, dict):
        return None
    prompt = count(usage.get("prompt_tokens"))
    return None if prompt is None else Usage(input_tokens=prompt)


class Embeddings(Protocol):
    name = "openai_embeddings"
    route = "/v1/embeddings"
    operation = "embeddings"
    upstream_path = "/embeddings"
    family = "openai"
    has_output = False

    def read_request(self, payload: dict) -> RequestFacts:
        model = require_model(payload)
        if not isinstance(payload.get("input"), str | list):
            raise SidecarError("invalid_request", "'input' must be a string or a list", param="input")
        if payload.get("stream"):
            raise SidecarError("invalid_request", "embeddings cannot be streamed", param="stream")
        return request_facts(payload, model, False, None)

    def read_body(self, body: bytes) -> BodyFacts:
        payload = loads_object(body) or {}
        return BodyFacts(usage_from_object(payload.get("usage")), common.model_of(payload), common.error_of(payload))

    def stream_reader(self, facts: RequestFacts) -> StreamReader:
        raise AssertionError("embeddings are never streamed")

    def error_body(self, error: SidecarError) -> bytes:
        return common.error_body(error)

    def stream_error(self, message: str) -> bytes:
        return common.stream_error(message)


PROTOCOL = Embeddings()
