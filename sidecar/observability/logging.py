"""Structured JSON logs, one object per line, with the request id and trace id of the call being served.

Log records carry facts through `extra=`; only the keys in _FIELDS are emitted, so nothing secret
can ride along by accident. And every line, tracebacks included, goes through scrub.for_logs before
it is written: known credentials and anything credential-shaped (a bearer token, an x-api-key value,
an `sk-` key, as in the raw header line aiohttp quotes when a request is malformed) are redacted.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time

import orjson

from sidecar import scrub

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# The call's trace id (observability/tracing.py): its own span's, or the caller's traceparent's.
trace_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

_FIELDS = (
    "workspace_id",
    "key_id",
    "model",
    "provider",
    "status",
    "http_status",
    "cost_micro",
    "duration_ms",
    "migration",
    "pg_version",
    "error",
    "outcome",
    "rows",
    "holds",
    "port",
    "url",
    "movement_kind",
    "amount_micro",
    "short_micro",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub.for_logs(record.getMessage()),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        trace_id = trace_id_var.get()
        if trace_id:
            entry["trace_id"] = trace_id
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = scrub.for_logs(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = scrub.for_logs(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc"] = scrub.for_logs(record.exc_text)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
