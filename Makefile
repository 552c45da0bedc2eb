.PHONY: demo test check coverage bench
demo:  ## run the instrumented demo app with a live view
	scripts/demo $(ARGS)
test:  ## the whole test suite (sets itself up); what CI runs
	scripts/test $(ARGS)
check:  ## the fast tier for the inner loop: lint, types, tests without real servers or processes
	scripts/check $(ARGS)
coverage:  ## branch coverage of the fast tier, with the gate (part of make test)
	scripts/coverage $(ARGS)
bench:  ## benchmarks against plain Starlette (ratios)
	scripts/setup-venv && .venv/bin/python bench/run_all.py
