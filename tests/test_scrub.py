"""sidecar/scrub.py: every credential the sidecar sent is redacted, in every spelling (issue 8.1)."""

from __future__ import annotations

import json
import logging
import sys

import orjson
import pytest

from sidecar import scrub
from sidecar.observability.logging import JsonFormatter
from sidecar.scrub import REDACTED, Scrubber

PLATFORM = "sk-platform-abc/def+ghi=="
BYOK = "sk-ant-customer-0123456789"


def _unicode_escaped(secret: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in secret)


@pytest.mark.parametrize(
    "spelling",
    [
        PLATFORM,
        PLATFORM.replace("/", "\\/"),  # PHP-style JSON
        _unicode_escaped(PLATFORM),
        _unicode_escaped(PLATFORM).upper().replace("\\U", "\\u"),
        json.dumps(PLATFORM, ensure_ascii=True)[1:-1].replace("/", "\\/"),
        "sk-platform-" + _unicode_escaped("abc/def") + "+ghi==",  # a mix
    ],
)
def test_every_json_spelling_of_a_key_is_redacted_in_text_and_bytes(spelling):
    scrubber = Scrubber([PLATFORM, BYOK])
    body = f'{{"error":{{"message":"Incorrect API key provided: {spelling}.","code":"invalid_api_key"}}}}'
    assert PLATFORM not in json.loads(scrubber.text(body))["error"]["message"]
    assert scrubber.text(body).count(REDACTED) == 1
    scrubbed = scrubber.bytes(body.encode())
    assert orjson.loads(scrubbed)["error"]["message"] == f"Incorrect API key provided: {REDACTED}."
    assert not scrubber.found_in(scrubbed)
    assert scrubber.found_in(body.encode()) and scrubber.found_in(body)


def test_every_secret_and_every_occurrence_goes_and_the_rest_stays():
    scrubber = Scrubber([PLATFORM, BYOK, None])
    text = f"a {BYOK} b {PLATFORM} c {BYOK}{BYOK} d"
    assert scrubber.text(text) == f"a {REDACTED} b {REDACTED} c {REDACTED}{REDACTED} d"
    event = b'data: {"model":"' + BYOK.encode() + b'","choices":[]}\n\n'
    assert scrubber.bytes(event) == b'data: {"model":"' + REDACTED.encode() + b'","choices":[]}\n\n'


def test_a_key_containing_another_key_is_redacted_whole():
    scrubber = Scrubber(["sk-short-12345", "sk-short-12345-longer"])
    assert scrubber.text("x sk-short-12345-longer y") == f"x {REDACTED} y"


def test_no_secrets_or_too_short_ones_change_nothing():
    assert not Scrubber([]) and not Scrubber([None, "", "short"])
    assert Scrubber(["short"]).text("short words") == "short words"
    assert Scrubber([]).bytes(b"\xff\xfe") == b"\xff\xfe"


def test_regex_metacharacters_in_a_key_are_literal():
    scrubber = Scrubber(["key.with*meta+chars(1)"])
    assert scrubber.text("keyXwith*meta+chars(1)") == "keyXwith*meta+chars(1)"
    assert scrubber.text("key.with*meta+chars(1)") == REDACTED


def test_non_utf8_bytes_around_a_secret_are_kept():
    scrubber = Scrubber([BYOK])
    assert scrubber.bytes(b"\xff" + BYOK.encode() + b"\xfe") == b"\xff" + REDACTED.encode() + b"\xfe"


def test_log_lines_lose_process_and_call_secrets_and_anything_key_shaped():
    scrub.remember("platform-secret-for-logs-1")
    token = scrub.call_secrets.set(("customer-secret-for-logs",))
    try:
        line = "upstream said platform-secret-for-logs-1 and customer-secret-for-logs"
        assert scrub.for_logs(line) == f"upstream said {REDACTED} and {REDACTED}"
    finally:
        scrub.call_secrets.reset(token)
    assert "customer-secret-for-logs" in scrub.for_logs("customer-secret-for-logs")  # only during its call
    for line, secret in [
        ("b'Authorization: Bearer sk-sc-abcdefghij\\x7f'", "sk-sc-abcdefghij"),
        ("b'Authorization : Bearer tok_123456789'", "tok_123456789"),
        ("b'x-api-key: plainsecret99'", "plainsecret99"),
        ("X-Api-Key:plainsecret99", "plainsecret99"),
        ("key sk-proj-ABCDEFGH12345 leaked", "sk-proj-ABCDEFGH12345"),
        ('{"authorization": "admintoken123"}', "admintoken123"),
    ]:
        assert secret not in scrub.for_logs(line), line


def test_the_json_log_formatter_scrubs_message_fields_and_tracebacks():
    scrub.remember("platform-key-in-a-log-line-42")
    try:
        raise ValueError("provider said: Authorization: Bearer tok-secret-in-traceback")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "sidecar.proxy",
        logging.WARNING,
        __file__,
        1,
        "upstream quoted %s",
        ("platform-key-in-a-log-line-42",),
        exc_info,
    )
    record.error = "key sk-live-ABCDEFGHIJKLMNOP was refused"
    line = JsonFormatter().format(record)
    for secret in ("platform-key-in-a-log-line-42", "tok-secret-in-traceback", "sk-live-ABCDEFGHIJKLMNOP"):
        assert secret not in line
    assert "upstream quoted [REDACTED]" in line and "ValueError" in line
