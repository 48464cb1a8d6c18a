# The two commands of the README, each doing all of its own set-up from nothing but the repo:
#   make demo    runs the demo
#   make test    runs the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test build bench deps clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

deps: $(VENV)/.deps

# Concurrent builds of one tree would race in its build directory: serialise them.
build: deps
	flock .build.lock $(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) examples/seed_scenarios.py --items 5000
	$(PY) examples/demo.py

bench: build
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build $(VENV) provcollate/*.so *.egg-info
