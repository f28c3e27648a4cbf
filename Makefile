# imagen_jax developer commands. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash

# JAX >= 0.11 needs Python 3.12; the machine default (3.11) silently gets an old jax.
# Find a real 3.12 interpreter: PATH first, then pyenv's and the system's install dirs.
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do \
  $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist load --durations=15

.PHONY: venv test lint format pytest demo bench clean

# The venv is rebuilt when missing or older than setup.py. It includes libtpu (the [tpu] extra)
# so that the deviceless TPU compile tests run here and in CI.
$(VENV)/.installed: setup.py
	@if [ -z "$(PYTHON312)" ]; then echo "error: python3.12 not found; install Python 3.12 or pass PYTHON312=/path/to/python3.12" >&2; exit 1; fi
	@if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then \
	  rm -rf $(VENV) && $(PYTHON312) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tpu]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

pytest: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint pytest

demo: venv
	$(VENV)/bin/imagen-jax demo --out=demo_out

bench: venv
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
