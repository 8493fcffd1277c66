# The two set-up commands of the README: `make test` and `make demo`.
# `make demo` runs every experiment at toy length and writes runs/demo/report.{md,html}.
# Both create .venv when missing, install torch 2.13.0 first when torch is absent
# (an unpinned torch would pull several GB of CUDA packages), then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradroute-installed

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# everything but the end-to-end runs and the multi-process tests (pytest marker `slow`)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# the real MNIST test set, used as held-out data when this checkout sits beside shared/
MNIST_DIR := $(wildcard ../shared/data/mnist)

demo: $(STAMP)
	$(VENV)/bin/gradroute reproduce --profile demo --out runs/demo $(if $(MNIST_DIR),--mnist-dir $(MNIST_DIR))

bench: $(STAMP)
	$(PY) benchmarks/routing_overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
