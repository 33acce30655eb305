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


# -- refusals of a single request (the service edge maps each class to its status) --------


class InvalidInputError(FloodError):
    """A request body is malformed (``malformed``) or names invalid fields; ``detail`` lists
    each problem as ``{"field", "reason", "type"}`` (or messages, for malformed JSON)."""

    def __init__(self, message: str, *, detail: list[object], code: str, malformed: bool = False) -> None:
        super().__init__(message)
        self.detail = detail
        self.code = code
        self.malformed = malformed


class TooLargeError(FloodError):
    """A request is over a size limit: its body, its batch, or its cost against a rate limit."""

    def __init__(self, message: str, *, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.headers = headers or {}


class UnsupportedMediaTypeError(FloodError):
    """A request body is declared as something other than JSON."""


class RateLimitedError(FloodError):
    """A key's rate limit is reached; ``headers`` carry the limit state and Retry-After."""

    def __init__(self, message: str, *, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.headers = headers


class OverloadedError(FloodError):
    """The model's batcher shed this request to keep latency within its deadline."""


class ModelUnavailableError(FloodError):
    """The model cannot answer now: not loaded yet, or its service dropped the call (its
    worker died and is being restarted)."""
