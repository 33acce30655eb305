"""The API's routes, one module per resource: predictions, the served model, health."""
