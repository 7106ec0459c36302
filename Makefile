# Set-up on a fresh machine needs only python3: `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= resid_mlp

.PHONY: setup run test test-slow clean

# torch first, pinned: the CPU build from the local wheel store (any other
# spec pulls a multi-GB CUDA build); then the project and its test extras.
$(BIN)/apd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/apd

setup: $(BIN)/apd

# The report is written even when verify fails; make still exits with verify's code.
run: setup
	$(BIN)/apd run --model $(MODEL); status=$$?; \
	  $(BIN)/apd report runs/$(MODEL).zarr && exit $$status

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
