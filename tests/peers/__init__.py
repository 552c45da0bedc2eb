"""FastAPI's and Starlette's own test suites, run with taskscope active (``scripts/peer-suites``)."""
