# Two entry points: `make quickstart` and `make test`. Both create .venv and install slimtune into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without an NVIDIA GPU: the CPU build of torch 2.13.0 (never the multi-GB CUDA wheels).
# With one (nvidia-smi lists a GPU): pip's default CUDA build. Override with `make TORCH_SPEC=... setup`.
TORCH_SPEC ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: setup quickstart test gpu-check clean

setup: $(VENV)/.installed

# The last install is test-only: the official MixLoRA inference package, which tests/test_mixlora.py loads our
# adapters with. Pinned, and --no-deps: it needs only torch/transformers/huggingface-hub, already installed.
$(VENV)/.installed: pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "slimtune needs Python >= 3.10, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps mixlora==0.2.3
	@touch $@

quickstart: setup
	$(BIN)/slimtune train configs/quickstart.yaml output.overwrite_output_dir=true

# ruff first: import order, pyflakes, pycodestyle and docstrings on the public API (pyproject.toml [tool.ruff])
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# On a machine with an NVIDIA GPU only (not part of `make test`): every CUDA-only test (copy streams, pinned homes,
# bitsandbytes' CUDA kernels), then the offload bench's quick model, whose table prints slimtune's ratios.
gpu-check: setup
	@nvidia-smi -L >/dev/null 2>&1 || { echo "make gpu-check needs an NVIDIA GPU (nvidia-smi lists none)"; exit 2; }
	$(BIN)/python -m pytest -q -rs -k "cuda" tests
	$(BIN)/python bench/offload.py --quick

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
