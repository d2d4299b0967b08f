"""The error table: one type per class, and every error rebuilt in an API process exactly as the engine process
raised it (class, message, headers), as service/ipc carries them."""

from __future__ import annotations

import pytest

from service import errors


def test_every_error_type_is_unique() -> None:
    types = [cls.type for cls in errors.TABLE]
    assert len(types) == len(set(types)), types


@pytest.mark.parametrize("cls", errors.TABLE, ids=lambda c: c.__name__)
def test_an_error_survives_the_wire(cls: type[errors.ServeError]) -> None:
    sent = errors.QueueFull.retry_in(3) if cls is errors.QueueFull else cls(f"{cls.__name__} happened")
    rebuilt = errors.from_wire(*errors.to_wire(sent))
    assert type(rebuilt) is cls
    assert isinstance(rebuilt, errors.ServeError)
    assert (rebuilt.message, rebuilt.headers) == (sent.message, sent.headers)


def test_a_disconnect_and_an_unexpected_error_cross_the_wire_as_what_they_mean() -> None:
    assert isinstance(errors.from_wire(*errors.to_wire(errors.Disconnected())), errors.Disconnected)
    failed = errors.from_wire(*errors.to_wire(ZeroDivisionError("boom")))
    assert isinstance(failed, errors.InferenceFailed) and failed.message == "ZeroDivisionError: boom"
    unknown = errors.from_wire("from_a_newer_engine", "what", {})
    assert isinstance(unknown, errors.InferenceFailed) and "from_a_newer_engine" in unknown.message
