"""Build-time packaging: registry versions imported into the BentoML store, ONNX-compiled and
checked, and Bentos built, found and served from them.

It runs where ``flood`` runs, never inside a Bento: ``bentofile.yaml`` does not ship it, and
``serving`` (what the Bento runs) never imports it.
"""
