"""Authenticated backup manifests: HMAC-SHA256 under BACKUP_SIGNING_KEY, as models are signed
under MODEL_SIGNING_KEY (:mod:`ops.signing`).

The HMAC covers the canonical JSON of every manifest field but the signature: the dump's file
name, size and sha256, kind, engine, database, row counts, Alembic revision, creation time,
tool and format. Verify checks the dump against the signed sha256, so the signature binds the
dump's bytes too. Without it, anyone who can write the backup folder can put a crafted dump
there with a manifest that matches it, and a restore brings back what they wrote (a revoked
key, active again at enterprise tier).

With the key set, an unsigned or mismatching manifest is refused; without it (the development
default) backups are unsigned and verify and restore say the manifest is unauthenticated.
Like :mod:`ops.backup.catalogue`, this module reads no database.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
from collections.abc import Sequence

from core.errors import BackupError
from core.settings import Settings
from ops.backup.catalogue import BackupManifest, manifest_name

logger = logging.getLogger(__name__)


def backup_signing_key(settings: Settings) -> bytes | None:
    """BACKUP_SIGNING_KEY, or None when it is unset or empty (backups are then unsigned)."""
    secret = settings.backup_signing_key
    if secret is None or not secret.get_secret_value():
        return None
    return secret.get_secret_value().encode()


def previous_backup_signing_keys(settings: Settings) -> list[bytes]:
    """BACKUP_SIGNING_KEY_PREVIOUS: keys of a rotation that still verify older backups."""
    return [secret.get_secret_value().encode() for secret in settings.backup_signing_key_previous]


def compute_manifest_signature(manifest: BackupManifest, key: bytes) -> str:
    data = dataclasses.asdict(manifest)
    del data["signature"]
    # isoformat keeps the UTC offset: the same wall time at +08:00 must not keep the signature.
    data["created_at"] = manifest.created_at.isoformat()
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def sign_manifest(manifest: BackupManifest, key: bytes) -> BackupManifest:
    return dataclasses.replace(manifest, signature=compute_manifest_signature(manifest, key))


def authenticate_manifest(
    manifest: BackupManifest, *, key: bytes | None, previous: Sequence[bytes] = ()
) -> bool:
    """Raise :class:`BackupError` unless ``manifest`` may be trusted; return whether its
    signature was checked (False: no key here, so it is unauthenticated). A signature under
    one of the ``previous`` keys (a rotation's overlap) is trusted too."""
    name = manifest_name(manifest.file)
    if key is None:
        logger.warning(
            "%s is not authenticated: BACKUP_SIGNING_KEY is not set, so a forged manifest would "
            "pass verify too%s",
            name,
            " (it is signed; set the key to check it)" if manifest.signature else "",
        )
        return False
    if manifest.signature is None:
        raise BackupError(
            f"{name} is not signed but BACKUP_SIGNING_KEY is set: anyone who can write the backup "
            "folder could have forged it, so it is refused. Use a signed backup (`flood backup "
            "run` makes one); only for a backup you know you made before backups were signed, "
            "run this one command with BACKUP_SIGNING_KEY unset"
        )
    if _signed_with(manifest, key):
        return True
    if any(_signed_with(manifest, old) for old in previous):
        logger.warning(
            "%s is signed with a key of BACKUP_SIGNING_KEY_PREVIOUS: trusted during the rotation; "
            "backups made from now on are signed with BACKUP_SIGNING_KEY",
            name,
        )
        return True
    raise BackupError(
        f"{name} does not match its signature: the manifest was altered after the backup "
        "(a dump and manifest written to match each other are refused the same way), or it "
        "was signed with a key that is neither BACKUP_SIGNING_KEY nor in "
        "BACKUP_SIGNING_KEY_PREVIOUS (after a rotation, list the old key there)"
    )


def _signed_with(manifest: BackupManifest, key: bytes) -> bool:
    expected = compute_manifest_signature(manifest, key)
    return manifest.signature is not None and hmac.compare_digest(
        expected.encode(), manifest.signature.encode()
    )
