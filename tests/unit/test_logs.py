"""service.logs: JSON and text lines, request ids from the ContextVar, the access log, and redaction: no secret
reaches the output, whichever way it is logged. Real handlers writing to a captured stderr."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import warnings
from collections.abc import Iterator

import pytest

from service import logs
from service.logs import (
    REDACTED,
    Redactor,
    configure_logging,
    log_access,
    new_request_id,
    request_id,
    valid_request_id,
)

SECRET = "sk-live-7Hq9x2ZpQ4vN8mR1"  # the configured API key
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"  # a bearer token nobody configured


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put the root and uvicorn loggers back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, {h: list(h.filters) for h in root.handlers})
    uvicorn = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in logs.UVICORN_LOGGERS}
    yield
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    for handler, filters in saved[2].items():
        handler.filters[:] = filters
    root.setLevel(saved[1])
    for name, (handlers, propagate) in uvicorn.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate
    logging.captureWarnings(False)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_carry_time_level_logger_message_and_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    log = logging.getLogger("bertserve.test")
    log.info("outside %s", "any request")
    token = request_id.set("req-42")
    try:
        log.warning("inside", extra={"fields": {"model": "bbc", "rows": 3}})
    finally:
        request_id.reset(token)
    log.debug("below the level")
    first, second = json_lines(capsys.readouterr().err)
    assert first["message"] == "outside any request" and first["request_id"] is None
    assert first["level"] == "INFO" and first["logger"] == "bertserve.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(first["time"])), first["time"]
    assert second == {**second, "message": "inside", "request_id": "req-42", "model": "bbc", "rows": 3}


def test_fields_cannot_overwrite_the_core_keys(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    logging.getLogger("x").info("real", extra={"fields": {"message": "forged", "level": "DEBUG", "extra": 1}})
    (line,) = json_lines(capsys.readouterr().err)
    assert line["message"] == "real" and line["level"] == "INFO" and line["extra"] == 1


def test_request_id_follows_each_asyncio_task(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    log = logging.getLogger("bertserve.test")

    async def handle(rid: str) -> None:
        request_id.set(rid)
        await asyncio.sleep(0)
        log.info("handled %s", rid)

    async def main() -> None:
        await asyncio.gather(*(handle(f"r{i}") for i in range(5)))

    asyncio.run(main())
    lines = json_lines(capsys.readouterr().err)
    assert len(lines) == 5 and all(line["message"] == f"handled {line['request_id']}" for line in lines)


def test_access_log_has_method_route_status_and_duration(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    token = request_id.set("abc")
    try:
        log_access("POST", "/v1/predict", 200, 3.14159)
    finally:
        request_id.reset(token)
    (line,) = json_lines(capsys.readouterr().err)
    assert line["logger"] == "bertserve.access" and line["request_id"] == "abc"
    assert (line["method"], line["route"], line["status"], line["duration_ms"]) == ("POST", "/v1/predict", 200, 3.142)
    assert line["message"] == "POST /v1/predict 200 3.1ms"


def test_access_log_off_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", "json")
    log_access("GET", "/healthz", 200, 0.1)
    assert capsys.readouterr().err == ""


def test_text_format_is_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "text")
    token = request_id.set("rid-1")
    try:
        log_access("GET", "/v1/models", 404, 1.0)
    finally:
        request_id.reset(token)
    logging.getLogger("bertserve").info("no request")
    first, second = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r"\S+Z INFO bertserve\.access \[rid-1\] GET /v1/models 404 1\.0ms "
        r"method=GET route=/v1/models status=404 duration_ms=1\.0",
        first,
    ), first
    assert second.endswith("INFO bertserve [-] no request"), second


def test_configure_twice_replaces_the_handler(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "text")
    configure_logging("info", "json", [SECRET])
    logging.getLogger("x").info("once %s", SECRET)
    (line,) = json_lines(capsys.readouterr().err)
    assert line["message"] == f"once {REDACTED}"
    with pytest.raises(ValueError, match="format"):
        configure_logging("info", "xml")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# redaction


class Leaky:
    """An object whose repr shows the key, as a careless settings or request object would."""

    def __repr__(self) -> str:
        return f"Leaky(api_key={SECRET!r})"


def log_secrets_every_way() -> None:
    """Everything a careless call site could do with a key or a token."""
    log = logging.getLogger("bertserve.careless")
    log.info(f"key in the message {SECRET}")
    log.info("key in an arg %s", SECRET)
    log.info("key in a %%r arg %r", Leaky())
    log.info("mapping args %(key)s", {"key": SECRET})
    log.info("headers %s", {"authorization": f"Bearer {TOKEN}", "x-api-key": SECRET})
    log.info("asgi headers %s", [(b"authorization", f"Bearer {TOKEN}".encode()), (b"host", b"x")])
    log.info("raw header line Authorization: Bearer %s", TOKEN)
    log.info("basic Authorization: Basic %s", "dXNlcjpwYXNzd29yZA==")
    log.info("extra fields", extra={"fields": {"key": SECRET, "nested": {"deep": [f"Bearer {TOKEN}"]}}})
    log.info("bytes field", extra={"fields": {"raw": SECRET.encode()}})
    log.info("stack", stack_info=True, extra={"fields": {"obj": Leaky()}})
    try:
        raise ValueError(f"bad key {SECRET} with token Bearer {TOKEN}")
    except ValueError:
        log.exception("exception text")
    logging.getLogger("uvicorn.error").error("uvicorn says %s", SECRET)
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "1.2.3.4", "GET", f"/?key={SECRET}", "1.1", 200)
    with warnings.catch_warnings():  # whatever filters earlier tests or imported libraries left in place
        warnings.simplefilter("always")
        warnings.warn(f"a warning quoting {SECRET}", UserWarning, stacklevel=1)
    token = request_id.set(SECRET)  # a client that sends its key as X-Request-ID (it passes validation)
    try:
        log.info("request id is the key")
    finally:
        request_id.reset(token)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_secret_ever_reaches_the_output(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addHandler(logging.StreamHandler())  # what uvicorn's own config would have installed
    uvicorn_logger.propagate = False
    configure_logging("debug", fmt, [SECRET])  # type: ignore[arg-type]
    log_secrets_every_way()
    err = capsys.readouterr().err
    assert SECRET not in err and TOKEN not in err and "dXNlcjpwYXNzd29yZA==" not in err
    assert SECRET.encode().hex() not in err
    assert err.count(REDACTED) >= 18, err
    assert "uvicorn says" in err and "a warning quoting" in err and "exception text" in err  # lines still there
    assert "ValueError: bad key [REDACTED]" in err
    if fmt == "json":
        assert len(json_lines(err)) == 16  # and every line is still one JSON object


def test_a_foreign_root_handler_is_redacted_too(caplog: pytest.LogCaptureFixture) -> None:
    """pytest's capture handler stands in for any handler someone else put on the root logger."""
    configure_logging("info", "json", [SECRET])
    with caplog.at_level(logging.INFO):
        logging.getLogger("x").info("to the foreign handler %s", SECRET)
    assert SECRET not in caplog.text and REDACTED in caplog.text


def test_redactor_keeps_ordinary_text_and_names_what_it_hid() -> None:
    redact = Redactor([SECRET, ""])  # an empty secret must not redact everything
    assert redact("POST /v1/predict 200 3.1ms") == "POST /v1/predict 200 3.1ms"
    assert redact(f"Authorization: Bearer {TOKEN}") == f"Authorization: {REDACTED}"
    assert redact(f"{{'authorization': 'Bearer {TOKEN}'}}") == f"{{'authorization': '{REDACTED}'}}"
    assert redact(f"token=Bearer {TOKEN} next") == f"token=Bearer {REDACTED} next"
    assert redact(f"x{SECRET}y") == f"x{REDACTED}y"
    assert redact(f"{SECRET.upper()}") == REDACTED  # case-insensitive: a key in a shouted message too
    assert redact("authorization, then the next step") == "authorization, then the next step"


# ----------------------------------------------------------------------------------------------------------------
# request ids


def test_new_request_ids_are_valid_and_distinct() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(valid_request_id(i) and len(i) == 16 for i in ids)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("abc-123", True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
        ("trace:span.1_2", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("has space", False),
        ("new\nline", False),
        ('quote"', False),
        ("é", False),
        ("abc\n", False),
    ],
)
def test_valid_request_id(value: str, ok: bool) -> None:
    assert valid_request_id(value) is ok
