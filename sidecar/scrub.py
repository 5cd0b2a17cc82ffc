"""Redacting credentials from what the sidecar relays, stores and logs.

A provider may quote the key it was sent (in an error body, a `model` field, a mid-stream error
event). `Scrubber(secrets)` replaces every occurrence of those exact secrets, also in their JSON
spellings: any character as a `\\uXXXX` escape (either hex case) and `/` as `\\/`. Pure and fast:
one compiled regular expression per scrubber, nothing else.

Scrub whole units (a body, one SSE event, one log line): a secret split across two network chunks
is only found once the chunks are joined.

Log lines get more (`for_logs`): the process's own credentials (platform keys, registered at
start), the credentials of the call being served (set with `call_secrets`), and anything that
looks like a bearer token, an `x-api-key` value or an `sk-` key.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"
SECRET_CHARS_MIN = 8  # shorter "secrets" would redact ordinary words; no provider key is this short


def _char_pattern(char: str) -> str:
    """One character of a secret: itself, or any JSON escape that decodes to it."""
    code = ord(char)
    forms = [re.escape(char)]
    if code <= 0xFFFF:
        forms.append(r"\\u" + "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d for d in f"{code:04x}"))
    if char == "/":
        forms.append(r"\\/")
    if char in '"\\':  # JSON's short escapes: \" and \\
        forms.append(re.escape("\\" + char))
    return forms[0] if len(forms) == 1 else "(?:" + "|".join(forms) + ")"


def _pattern(secret: str) -> str:
    return "".join(_char_pattern(c) for c in secret)


class Scrubber:
    """Replaces every given secret (strings of at least SECRET_CHARS_MIN; None and shorter ones are
    ignored) with REDACTED, in str and in bytes (UTF-8)."""

    __slots__ = ("_bytes_re", "_text_re")

    def __init__(self, secrets: Iterable[str | None]) -> None:
        unique = sorted({s for s in secrets if s and len(s) >= SECRET_CHARS_MIN}, key=len, reverse=True)
        if unique:
            source = "|".join(_pattern(s) for s in unique)
            self._text_re: re.Pattern[str] | None = re.compile(source)
            self._bytes_re: re.Pattern[bytes] | None = re.compile(source.encode())
        else:
            self._text_re = self._bytes_re = None

    def __bool__(self) -> bool:
        return self._text_re is not None

    def text(self, value: str) -> str:
        return self._text_re.sub(REDACTED, value) if self._text_re is not None else value

    def bytes(self, value: bytes) -> bytes:
        return self._bytes_re.sub(REDACTED.encode(), value) if self._bytes_re is not None else value

    def found_in(self, value: str | bytes) -> bool:
        pattern = self._bytes_re if isinstance(value, bytes) else self._text_re
        return pattern is not None and pattern.search(value) is not None


# --- log lines ------------------------------------------------------------------------------------

_process_secrets: set[str] = set()
_process_scrubber = Scrubber(())
# The credentials sent upstream for the call this task serves (its customer's own key): log lines
# written while serving it are scrubbed of them too.
call_secrets: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("call_secrets", default=())

# Credential-shaped text, whatever its value: `Bearer <token>`, `x-api-key: <key>`, `sk-...` keys.
# Header names match case-insensitively and with stray spaces before the colon (the raw header
# lines aiohttp's parser quotes in its errors may be malformed in exactly that way).
_SHAPES = re.compile(
    r"(?i)(?P<lead>\bbearer\s+|\b(?:x-api-key|api-key|authorization|proxy-authorization)[\"']?\s*[:=]\s*[\"']?"
    r"(?:bearer\s+)?)"
    r"(?P<value>[^\s'\",}]+)"
    r"|(?P<sk>\bsk-[A-Za-z0-9_\-]{8,})"
)


def _shape(match: re.Match[str]) -> str:
    if match.group("sk"):
        return "sk-" + REDACTED
    return match.group("lead") + REDACTED


def remember(secret: str | None) -> None:
    """A credential of the whole process (a platform key, the bootstrap admin token): never logged."""
    global _process_scrubber
    if secret and len(secret) >= SECRET_CHARS_MIN and secret not in _process_secrets:
        _process_secrets.add(secret)
        _process_scrubber = Scrubber(_process_secrets)


def for_logs(text: str) -> str:
    """A log line with every known credential and anything credential-shaped redacted."""
    text = _process_scrubber.text(text)
    secrets = call_secrets.get()
    if secrets:
        text = Scrubber(secrets).text(text)
    return _SHAPES.sub(_shape, text)
