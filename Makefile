# Quick start: `make serve` serves the built-in default model; `make test` runs the tests.
# Both create .venv and install batchd into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/default.toml
# torch and torchvision are pinned to the releases this project is tested with; pip takes
# them from a local wheel cache where the machine has one.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Two pytest workers (pytest-xdist) took the suite from about 9.5 to 6.5 minutes on 2 cores
# when they came in (about 6 now, with more tests): much of it waits on real servers
# starting and answering. A module's tests stay in one
# worker, in file order (--dist loadfile): several share a module-scoped server and read
# its books. More workers than 2 only oversubscribe a small host; the suite was tested so.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: serve test lint install clean image-check docs reference proto

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

# The documentation site, served at http://127.0.0.1:8001 while you edit docs/ (the tests
# build it with mkdocs build --strict).
docs: install
	$(BIN)/mkdocs serve -a 127.0.0.1:8001

# Write the generated reference pages again (the tests fail when they are stale).
reference: install
	$(BIN)/python -m batchd.config_reference > docs/configuration.md
	$(BIN)/python -m batchd.http.api_reference docs

# Build the image, run it as docs/deployment.md does and check it (skips where no
# container engine can run); see loadtest/image_check.py.
image-check: install
	$(BIN)/python -m loadtest.image_check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site

# The gRPC service's Python modules, generated from batchd/grpc/inference.proto (committed;
# tests/test_grpc.py fails when they are stale).
proto: install
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		batchd/grpc/inference.proto
