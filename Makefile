# psmsearch front door. `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
# GPU users: install your CUDA build of torch into .venv first (or set TORCH_SPEC), then run these.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On CPU machines this takes the CPU wheel (fast, small). An unpinned `torch` pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-all demo check bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

demo: setup
	$(VENV)/bin/psmsearch search search_spaces/quick.yaml --resume
	$(VENV)/bin/psmsearch compare --experiment quick-s3 --out psmsearch_compare

check: setup
	$(VENV)/bin/psmsearch check --all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
