# Quick start: `make serve` serves the built-in default model; `make test` runs the tests.
# Both create .venv and install batchd into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/default.toml
# torch and torchvision are pinned to the releases this project is tested with; pip takes
# them from a local wheel cache where the machine has one.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: serve test lint install clean image-check

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[test,load,onnx]'
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/batchd serve --config $(CONFIG)

lint: install
	$(BIN)/ruff check batchd tests loadtest
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Build the image, run it as the README does and check it (skips where no container
# engine can run); see loadtest/image_check.py.
image-check: install
	$(BIN)/python -m loadtest.image_check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
