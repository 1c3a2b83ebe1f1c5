# Two commands a new user needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Override for another platform, e.g. TORCH="torch torchvision" (the CPU or CUDA build you want).
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-browser test-slow test-floors lint lab clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name xraylib --display-name "Python (xraylib)" >/dev/null
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/xraylib demo

test: install
	$(BIN)/python -m pytest

# JupyterLab in headless Chromium: Debian's `chromium` package (apt-get install chromium), no browser download.
test-browser: install
	$(BIN)/python -m pytest -n 0 -m browser

test-slow: install
	$(BIN)/python -m pytest -n 0 -m slow

# The suite with every runtime dependency at its floor in pyproject.toml (a fresh venv; downloads torch).
test-floors:
	$(PYTHON) tools/check_floors.py

lint: install
	$(BIN)/ruff check xraylib tests benchmarks

lab: install
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) demo-output test-output .pytest_cache
