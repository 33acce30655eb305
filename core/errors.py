"""Domain exceptions. HTTP status codes are chosen only at the service edge."""

from __future__ import annotations


class FloodError(Exception):
    """Base class for errors this system raises on purpose, with a message meant for people."""


class DataError(FloodError):
    """Input data is missing, malformed or unusable for training."""


class RegistryError(FloodError):
    """The model registry cannot do what was asked (unknown version, no champion, ...)."""


class ModelIntegrityError(RegistryError):
    """Model files do not match the checksum or signature recorded for them."""


class PromotionRefused(RegistryError):
    """A model version may not become champion (synthetic data, failed validation, ...)."""


class ConfigurationError(FloodError):
    """Settings are unsafe or inconsistent for the environment they run in."""


class AuthenticationError(FloodError):
    """A request's API key is missing, unknown, revoked or expired; ``reason`` says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ApiKeyError(FloodError):
    """An API key cannot be managed as asked (unknown id, already revoked, ...)."""


class DependencyUnavailableError(FloodError):
    """A backing service (database, Redis) is unreachable and the request cannot be served
    safely without it (e.g. rate limiting configured to fail closed)."""


class BackupError(FloodError):
    """A backup cannot be made, verified, restored or found; the message says which and why."""
