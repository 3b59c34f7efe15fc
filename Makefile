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

# Test-only references: torchscale's BEiT3, which the checkpoint-conversion tests compare against
# (its pins, timm 0.6.13, do not apply here, hence --no-deps; without it those tests skip), and
# transformers, whose Mixtral MoE block `mmoe bench moe` times beside ours (the bench extra).
$(VENV)/.references: $(BIN)/mmoe
	$(BIN)/pip install --no-deps torchscale==0.3.0 fairscale==0.4.0 || \
		echo "warning: torchscale could not be installed; the conversion tests that compare with it will skip"
	$(BIN)/pip install 'transformers==5.23.0'
	touch $@

test: $(BIN)/mmoe $(VENV)/.references
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
