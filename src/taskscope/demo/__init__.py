"""``taskscope demo``: an instrumented FastAPI app, a load generator and a live view.

Needs the ``demo`` extra (``pip install 'taskscope[demo]'``). Nothing here is imported by
``import taskscope``.
"""
