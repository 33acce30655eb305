"""What runs inside the Bento: the two BentoML services (``services``), the model
(``predictor``, ``compiled``), the per-worker coalescer and operations, start-up and
shutdown, and the HTTP edge (``api``). Nothing here imports ``training`` or ``bundle``.
"""
