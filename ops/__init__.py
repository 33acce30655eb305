"""Operations around the model service: API keys, rate limits, the prediction log, the
ops database and its migrations, configuration checks and model signing.

Everything here is framework-agnostic and synchronous; the service maps the domain errors
to HTTP status codes at its edge.
"""
