# Two commands do all set-up:  `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV ?= .venv
# CPU machines: this pinned build comes from the local wheel cache; GPU users can pre-install their
# CUDA build in $(VENV) (or pass TORCH_SPEC=...) and it is kept as is.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo train test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python examples/demo.py

# pytest exits 5 when it collected nothing: treat that as a failure, not a pass.
test: setup
	$(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
