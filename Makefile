# The two commands of the README, each doing all of its own set-up from nothing but the repo:
#   make demo    runs the demo
#   make test    runs the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test test-ray build bench deps clean gpu-check

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
	@echo "make test: again on the pure-PyTorch paths (PROVCOLLATE_EXTENSION=0): same outputs, same errors"
	PROVCOLLATE_EXTENSION=0 $(PY) -m pytest -q -W "ignore:provcollate. PROVCOLLATE_EXTENSION=0:RuntimeWarning" \
		tests/test_collate.py tests/test_ops.py tests/test_record.py tests/test_hardening.py tests/test_fuzz.py tests/test_keys.py tests/test_fingerprints.py

# provcollate.integrations.ray on a local 2-CPU Ray (also part of `make test`: about a minute).
test-ray: build
	$(PY) -m pytest -q tests/test_integrations_ray.py

demo: build
	$(PY) examples/seed_scenarios.py --items 5000
	$(PY) examples/demo.py

bench: build
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build $(VENV) provcollate/*.so *.egg-info

# The GPU proof kit (gpu/check.sh): on a GPU machine with no venv, its own python3 and torch
# (GPU_PYTHON=... names another); DRY_RUN=1 runs the same plumbing on a CPU machine with this
# checkout's venv and extension, set up first as for `make test` (so it passes in a fresh clone),
# and gathers build/gpu-deps, which the GPU run needs carried along.
DRY_RUN ?= 0
GPU_PYTHON ?= $(if $(filter 1,$(DRY_RUN)),$(PY),python3)
gpu-check: $(if $(filter 1,$(DRY_RUN)),build)
	DRY_RUN=$(DRY_RUN) GPU_PYTHON=$(GPU_PYTHON) bash gpu/check.sh
