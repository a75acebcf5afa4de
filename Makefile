# The two commands the README names; each sets up a fresh machine first (.ci/setup).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench

setup:
	@bash .ci/setup

## The main job: the end-to-end demo on embedded defaults (broker, cloud, agents, rollouts).
demo: setup
	$(VENV)/bin/lepton-edge demo

## The whole test suite, slow cases included (what CI runs).
test: setup
	$(PY) -m pytest -p no:cacheprovider --durations=15 tests

## Everything but the cases marked slow.
test-fast: setup
	$(PY) -m pytest -p no:cacheprovider -m "not slow" tests

## Benchmarks: each prints a table and writes benchmarks/results/<name>.json.
bench: setup
	$(PY) benchmarks/convert_bench.py
	$(PY) benchmarks/agent_bench.py
	$(PY) benchmarks/fleet_bench.py
	$(PY) benchmarks/broker_bench.py
