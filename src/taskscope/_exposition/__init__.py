"""Serving Prometheus metrics without stalling the event loop (see taskscope.exposition)."""
