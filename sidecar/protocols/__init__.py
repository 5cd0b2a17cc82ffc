"""Wire protocols: pure functions from bytes to facts and back. No I/O here."""

from __future__ import annotations

from sidecar.protocols import (
    anthropic_messages,
    openai_chat,
    openai_completions,
    openai_embeddings,
    openai_responses,
)
from sidecar.protocols.base import Protocol

ALL: tuple[Protocol, ...] = (
    openai_chat.PROTOCOL,
    openai_completions.PROTOCOL,
    openai_embeddings.PROTOCOL,
    openai_responses.PROTOCOL,
    anthropic_messages.PROTOCOL,
)
