# Set-up and everyday commands. `make serve` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install serve generate test

$(BIN)/loraplex: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so the range in pyproject does not pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/loraplex

install: $(BIN)/loraplex

serve: install
	$(BIN)/loraplex serve --config examples/serve_config.yaml

generate: install
	$(BIN)/loraplex generate --model default --chat "What is the capital of France?"

test: install
	$(BIN)/loraplex model pull
	$(BIN)/python -m pytest -q
