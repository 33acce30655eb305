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
