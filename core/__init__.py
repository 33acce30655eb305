"""Shared domain pieces: settings, the observation contract, derived features, errors."""
