"""BentoML entry point (``service:FloodRiskAPI``); the services live in ``serving.services``."""

from __future__ import annotations

from serving.services import FloodRiskAPI, FloodRiskModel

__all__ = ["FloodRiskAPI", "FloodRiskModel"]
