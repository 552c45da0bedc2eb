.PHONY: demo test bench
demo:  ## run the instrumented demo app with a live view
	scripts/demo $(ARGS)
test:  ## the whole test suite (sets itself up)
	scripts/test $(ARGS)
bench:  ## benchmarks against plain Starlette (ratios)
	scripts/setup-venv && .venv/bin/python bench/run_all.py
