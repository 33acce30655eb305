"""Benchmarks: our Bento against the peers a user would pick instead (``make bench``)."""
