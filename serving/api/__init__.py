"""The HTTP edge: a FastAPI app (``app``) of routes (``routes``), their dependencies
(``deps``: backend, API key, charge, bounded bodies), one error shape (``errors``), response
headers (``headers``) and bodies (``schemas``). It reaches the model only through the
service instance (``serving.services.FloodRiskAPI``), found with ``bentoml.get_current_service``.
"""
