# `make demo` and `make test` each build the virtual environment they need (.venv) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/mmoe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $@

demo: $(BIN)/mmoe
	$(BIN)/mmoe pretrain --run-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(BIN)/mmoe
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
