"""Model signing: HMAC-SHA256 with MODEL_SIGNING_KEY over every file of a model directory.

The signature is made when a model is promoted or built into a Bento and travels with the
files as ``flood-signature.json``. It binds file names and contents, so a changed, added,
removed or renamed file all break it. With REQUIRE_MODEL_SIGNATURE=true a service refuses
to start on a missing or wrong signature; there is no fallback to an unsigned model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path

from core.checksum import sha256_file
from core.errors import ConfigurationError, ModelIntegrityError
from core.settings import Settings, get_settings

logger = logging.getLogger(__name__)

SIGNATURE_FILE = "flood-signature.json"
ALGORITHM = "HMAC-SHA256"


def signing_key(settings: Settings | None = None) -> bytes:
    settings = settings or get_settings()
    if settings.model_signing_key is None or not settings.model_signing_key.get_secret_value():
        raise ConfigurationError(
            "MODEL_SIGNING_KEY is not set; set it to a long random secret shared by the "
            "machines that promote models and the services that load them"
        )
    return settings.model_signing_key.get_secret_value().encode()


def hash_model_files(model_dir: Path) -> dict[str, str]:
    """SHA-256 of every file under ``model_dir`` by POSIX relative path, signature excluded."""
    if not model_dir.is_dir():
        raise ModelIntegrityError(f"model directory {model_dir} does not exist")
    digests: dict[str, str] = {}
    for path in sorted(model_dir.rglob("*")):
        if not path.is_file() or path.relative_to(model_dir).as_posix() == SIGNATURE_FILE:
            continue
        digests[path.relative_to(model_dir).as_posix()] = sha256_file(path)
    return digests


def compute_signature(files: dict[str, str], key: bytes) -> str:
    # NUL and newline cannot occur in the hex digests, and a path would need both to forge
    # a different manifest with the same bytes.
    manifest = "".join(f"{name}\0{digest}\n" for name, digest in sorted(files.items()))
    return hmac.new(key, manifest.encode(), hashlib.sha256).hexdigest()


def sign_model_dir(model_dir: Path, key: bytes | None = None) -> Path:
    """Write ``flood-signature.json`` into ``model_dir`` and return its path."""
    key = key if key is not None else signing_key()
    files = hash_model_files(model_dir)
    if not files:
        raise ModelIntegrityError(f"model directory {model_dir} has no files to sign")
    document = {
        "algorithm": ALGORITHM,
        "files": files,
        "signature": compute_signature(files, key),
    }
    path = model_dir / SIGNATURE_FILE
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("signed %d model files in %s", len(files), model_dir)
    return path


def verify_model_dir(model_dir: Path, key: bytes | None = None) -> None:
    """Raise :class:`ModelIntegrityError` unless the signature matches the files now present."""
    key = key if key is not None else signing_key()
    path = model_dir / SIGNATURE_FILE
    if not path.is_file():
        raise ModelIntegrityError(
            f"model at {model_dir} is not signed ({SIGNATURE_FILE} missing); rebuild its Bento "
            "with MODEL_SIGNING_KEY set (`flood bento build --version N`), which signs the model"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        recorded_files = dict(document["files"])
        recorded_signature = str(document["signature"])
        algorithm = document["algorithm"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelIntegrityError(f"{path} is not a readable signature ({exc})") from exc
    if algorithm != ALGORITHM:
        raise ModelIntegrityError(f"{path}: unsupported algorithm {algorithm!r}")
    files = hash_model_files(model_dir)
    if hmac.compare_digest(compute_signature(files, key), recorded_signature):
        return
    # The recorded file list is not trusted on its own; it only helps name what changed.
    changed = sorted(
        name for name in files.keys() | recorded_files.keys() if files.get(name) != recorded_files.get(name)
    )
    detail = f"changed files: {', '.join(changed)}" if changed else "wrong MODEL_SIGNING_KEY?"
    raise ModelIntegrityError(f"model signature check failed for {model_dir} ({detail})")


def check_model_at_start(model_dir: Path, settings: Settings | None = None) -> bool:
    """Service start: verify when REQUIRE_MODEL_SIGNATURE is on (no fallback), and also when
    a signature and key are both present. Returns whether the model was verified."""
    settings = settings or get_settings()
    if settings.signature_required:
        verify_model_dir(model_dir, signing_key(settings))
        return True
    if (model_dir / SIGNATURE_FILE).is_file() and settings.model_signing_key is not None:
        verify_model_dir(model_dir, signing_key(settings))
        return True
    return False
