"""Model signing: a tampered byte, a missing signature or a wrong key stops the service."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigurationError, ModelIntegrityError
from core.settings import get_settings
from ops.signing import SIGNATURE_FILE, check_model_at_start, sign_model_dir, verify_model_dir

KEY = b"model-signing-key-for-tests-0123456789"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    (directory / "sub").mkdir(parents=True)
    (directory / "pipeline.skops").write_bytes(bytes(range(256)) * 40)
    (directory / "MLmodel").write_text("flavors: {}\n")
    (directory / "sub" / "thresholds.json").write_text('{"alert": 0.3}')
    return directory


def test_signed_model_verifies(model_dir: Path) -> None:
    path = sign_model_dir(model_dir, KEY)
    assert path == model_dir / SIGNATURE_FILE
    verify_model_dir(model_dir, KEY)


def test_one_tampered_byte_is_refused(model_dir: Path) -> None:
    sign_model_dir(model_dir, KEY)
    target = model_dir / "pipeline.skops"
    data = bytearray(target.read_bytes())
    data[5000] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"pipeline\.skops"):
        verify_model_dir(model_dir, KEY)


@pytest.mark.parametrize("change", ["added", "removed", "renamed"])
def test_file_set_changes_are_refused(model_dir: Path, change: str) -> None:
    sign_model_dir(model_dir, KEY)
    if change == "added":
        (model_dir / "extra.py").write_text("import os\n")
    elif change == "removed":
        (model_dir / "MLmodel").unlink()
    else:
        (model_dir / "MLmodel").rename(model_dir / "MLmodel2")
    with pytest.raises(ModelIntegrityError):
        verify_model_dir(model_dir, KEY)


def test_wrong_key_and_missing_signature_are_refused(model_dir: Path) -> None:
    with pytest.raises(ModelIntegrityError, match="not signed"):
        verify_model_dir(model_dir, KEY)
    sign_model_dir(model_dir, KEY)
    with pytest.raises(ModelIntegrityError, match="signature check failed"):
        verify_model_dir(model_dir, b"another key entirely")


def test_forged_manifest_without_the_key_is_refused(model_dir: Path) -> None:
    sign_model_dir(model_dir, KEY)
    (model_dir / "pipeline.skops").write_bytes(b"evil")
    sign_model_dir(model_dir, b"attacker key")  # rewrites hashes and signature consistently
    with pytest.raises(ModelIntegrityError):
        verify_model_dir(model_dir, KEY)


def test_service_start_requires_a_signature_when_configured(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUIRE_MODEL_SIGNATURE", "true")
    get_settings.cache_clear()
    with pytest.raises(ConfigurationError, match="MODEL_SIGNING_KEY"):
        check_model_at_start(model_dir)
    monkeypatch.setenv("MODEL_SIGNING_KEY", KEY.decode())
    get_settings.cache_clear()
    with pytest.raises(ModelIntegrityError, match="not signed"):
        check_model_at_start(model_dir)
    sign_model_dir(model_dir)
    assert check_model_at_start(model_dir) is True
    (model_dir / "MLmodel").write_text("flavors: {tampered: 1}\n")
    with pytest.raises(ModelIntegrityError):
        check_model_at_start(model_dir)


def test_unsigned_model_is_allowed_only_when_not_required(model_dir: Path) -> None:
    assert check_model_at_start(model_dir) is False
