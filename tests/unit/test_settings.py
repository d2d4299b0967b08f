"""Settings that deployments rely on: keys from files (Docker and Kubernetes secrets), the admin key, the gRPC port
following the HTTP port, and a process started from another's settings (the supervisor's children)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings


def test_the_grpc_port_follows_the_http_port_unless_set() -> None:
    assert Settings().grpc_listen_port == 8001
    assert Settings(port=9000).grpc_listen_port == 9001
    assert Settings(port=9000, grpc_port=7000).grpc_listen_port == 7000
    assert Settings(port=9000, grpc_port=0).grpc_listen_port == 0  # off
    assert Settings(port=0).grpc_listen_port == 0  # an ephemeral HTTP port has no port to follow
    with pytest.raises(ValidationError, match="no port for gRPC"):
        Settings(port=65535)
    with pytest.raises(ValidationError, match="must differ"):
        Settings(port=9000, grpc_port=9000)


def test_the_grpc_port_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTSERVE_PORT", "9100")
    assert Settings().grpc_listen_port == 9101


def test_keys_come_from_files_without_their_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("inference-key\n")
    (tmp_path / "admin").write_text("  admin-key\r\n")
    settings = Settings(api_key_file=tmp_path / "key", admin_api_key_file=tmp_path / "admin")
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "inference-key"
    assert settings.admin_key is not None and settings.admin_key.get_secret_value() == "admin-key"
    assert settings.secrets() == ["inference-key", "admin-key"]
    again = Settings(**settings.model_dump())  # how the supervisor hands its settings to its processes
    assert again.api_key == settings.api_key and again.admin_api_key == settings.admin_api_key


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), ("", "is empty"), ("\n \n", "is empty")],
    ids=["missing", "empty", "blank"],
)
def test_an_unusable_key_file_refuses_to_start(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValidationError, match=message):
        Settings(api_key_file=path)


def test_a_key_and_a_different_key_file_refuse_to_start(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("one")
    with pytest.raises(ValidationError, match="not both"):
        Settings(api_key="two", api_key_file=tmp_path / "key")


def test_the_admin_key_defaults_to_the_api_key() -> None:
    assert Settings().admin_key is None
    assert Settings(api_key="k").admin_key is not None
    assert Settings(api_key="k").admin_key.get_secret_value() == "k"  # type: ignore[union-attr]
    assert Settings(api_key="k", admin_api_key="a").admin_key.get_secret_value() == "a"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["", "a b", "../x", "{{.Name}}"])
def test_a_model_name_must_be_a_plain_name(name: str) -> None:
    with pytest.raises(ValidationError):
        Settings(model_name=name)
