"""Structured logs: one parseable record per line, never a secret."""

import io
import json
import logging

from hub.core._logging import configure_logging, kv


def _capture(fmt: str):
    stream = io.StringIO()
    configure_logging("debug", fmt, stream)
    return stream


def test_json_lines_with_fields_and_no_secrets():
    stream = _capture("json")
    log = logging.getLogger("cowork.test")
    log.info(
        "pairing.redeemed",
        **kv(
            pairing_id="p1",
            admin_token="abc",
            dsn="postgresql://u:pw@h/db",
            note="jwt eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJVQUJDIn0.c2lnbmF0dXJlMTIz",
        ),
    )
    log.warning("url postgresql://user:hunter2@db/x failed")
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["event"] == "pairing.redeemed" and first["level"] == "info"
    assert first["pairing_id"] == "p1" and first["logger"] == "cowork.test"
    assert first["admin_token"] == first["dsn"] == "[secret-redacted]"
    assert "eyJ" not in first["note"]
    assert "hunter2" not in second["event"]


def test_text_format_is_key_value():
    stream = _capture("text")
    logging.getLogger("cowork.test").info("hub.started", **kv(http="http://x", password="p"))
    line = stream.getvalue().strip()
    assert (
        "hub.started" in line and "http=http://x" in line and "password=[secret-redacted]" in line
    )
