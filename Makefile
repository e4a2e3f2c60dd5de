# Two commands do all set-up: `make train` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
# CPU machines: this pinned build comes from the local wheel cache; GPU users can pre-install their
# CUDA build in $(VENV) (or pass TORCH_SPEC=...) and it is kept as is.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup browser train test bench ablation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# openai-clip: OpenAI's original CLIP code, the reference of tests/test_convert.py; --no-deps because its
# declared dependencies pull torchvision and another torch build.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml Makefile
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,app,serve,faiss,milvus]"
	$(BIN)/python -m pip install -q --no-deps openai-clip==1.0.1
	touch $@

setup: $(VENV)/.installed

# The main job (recipes/synthetic.json): generate the synthetic benchmark, train the tiny DECD on it from
# random weights on a CPU, evaluate the best model on the unseen test identities, and draw a retrieval grid.
OUTPUT ?= outputs/decd-tiny-synthetic
train: setup
	$(BIN)/python examples/train.py recipes/synthetic.json --output_dir $(OUTPUT)
	$(BIN)/python examples/evaluate.py $(OUTPUT) --dataset_name synthetic --split test

bench: setup
	$(BIN)/python benchmarks/encode.py --preset base

ablation: setup
	$(BIN)/python benchmarks/ablation.py

# tests/test_app_browser.py drives headless Chromium: install Debian's package when it is missing (CI
# runs as root on a clean Debian machine). If it cannot be installed, that test fails; it never skips.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	      || echo "warning: could not install chromium; tests/test_app_browser.py will fail" >&2; \
	    else echo "warning: chromium is missing (apt-get install -y chromium); tests/test_app_browser.py will fail" >&2; fi; }

# pytest exits 5 when it collected nothing: treat that as a failure, not a pass.
test: setup browser
	$(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
