# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo lint test test-slow test-all bench bench-realsize bench-continual doctor clean

setup:
	@bash scripts/setup.sh

## Set up, then run one real distillation job end to end on the embedded tiny models.
demo: setup
	$(VENV)/bin/kd-worker demo

## Formatting, lint and types (configured in pyproject.toml): any finding fails.
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## Set up, lint, then run the test suite CI runs (slow suites excluded).
test: lint
	$(PY) -m pytest -m "not slow" -q

## Long fault-injection cases and real-size models.
test-slow: setup
	$(PY) -m pytest -m slow -q

test-all: setup
	$(PY) -m pytest -q

## All benchmarks; tables printed, JSON written to bench/results/.
bench: setup
	$(PY) -m bench.run_all

## Qwen2.5-shaped models with the real vocabulary (0.5B/1.5B job, 7B + 3B memory): ~11 GB under
## .kd/realsize, 30-60 min on 2 cores; writes bench/results/realsize.json.
bench-realsize: setup
	$(PY) -m bench.realsize

## Continual distillation: retention over 5 jobs of disjoint facts, 3 seeds (long; not in `make bench`).
bench-continual: setup
	$(PY) -m bench.continual

doctor: setup
	$(VENV)/bin/kd-worker doctor

clean:
	rm -rf $(VENV) .kd .pytest_cache .mypy_cache .ruff_cache
