# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow test-all bench bench-continual doctor clean

setup:
	@bash scripts/setup.sh

## Set up, then run one real distillation job end to end on the embedded tiny models.
demo: setup
	$(VENV)/bin/kd-worker demo

## Set up, then run the test suite CI runs (slow suites excluded).
test: setup
	$(PY) -m pytest -m "not slow" -q

## Long fault-injection cases and real-size models.
test-slow: setup
	$(PY) -m pytest -m slow -q

test-all: setup
	$(PY) -m pytest -q

## All benchmarks; tables printed, JSON written to bench/results/.
bench: setup
	$(PY) -m bench.run_all

## Continual distillation: retention over 5 jobs of disjoint facts, 3 seeds (long; not in `make bench`).
bench-continual: setup
	$(PY) -m bench.continual

doctor: setup
	$(VENV)/bin/kd-worker doctor

clean:
	rm -rf $(VENV) .kd .pytest_cache
