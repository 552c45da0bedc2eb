"""FastAPI's and Starlette's own test suites, run with taskscope on (scripts/peer-suites)."""
