# Two entry points: `make demo` (set up + the main job on the offline default data)
# and `make test` (set up + the test suite). Both work on a fresh clone with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (a CPU build installs from local disk); pyproject stays permissive.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test lint clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev,ray]"  # ray: the real Ray sweep test
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/ruff check contlearn envs agents scripts tests
	$(BIN)/python -m pytest -q -m "slow or not slow"  # the slow ones too: ~20 s more

lint: setup
	$(BIN)/ruff check contlearn envs agents scripts tests
	$(BIN)/ruff format --check contlearn envs agents scripts tests

clean:
	rm -rf $(VENV) build *.egg-info
