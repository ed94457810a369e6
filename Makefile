# Two entry points: `make demo` (set up + the main job on the offline default data)
# and `make test` (set up + the test suite). Both work on a fresh clone with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (a CPU build installs from local disk); pyproject stays permissive.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test lint typecheck format-check clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev,ray,tensorboard,wandb]"  # (the extras' tests)
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python scripts/demo.py

test: setup typecheck format-check
	$(BIN)/ruff check contlearn envs agents scripts tests
	$(BIN)/python -m pytest -q -m "slow or not slow"  # the slow ones too: ~20 s more

lint: setup
	$(BIN)/ruff check contlearn envs agents scripts tests
	$(BIN)/ruff format --check contlearn envs agents scripts tests

format-check: setup
	$(BIN)/ruff format --check contlearn envs agents scripts tests

# mypy over the three packages ([tool.mypy] in pyproject.toml). It cannot map package-dir
# (contlearn.envs is envs/, contlearn.agents is agents/), so it checks a tree of links shaped
# like the installed package, rebuilt each time; errors name the files in this repository.
TYPETREE := build/typecheck/contlearn
typecheck: setup
	rm -rf $(TYPETREE) && mkdir -p $(TYPETREE)
	ln -s $(CURDIR)/contlearn/* $(TYPETREE)/
	ln -s $(CURDIR)/envs $(TYPETREE)/envs
	ln -s $(CURDIR)/agents $(TYPETREE)/agents
	@$(BIN)/mypy > build/typecheck/mypy.txt; status=$$?; \
	  sed -e 's|^$(TYPETREE)/envs/|envs/|' -e 's|^$(TYPETREE)/agents/|agents/|' \
	      -e 's|^build/typecheck/||' build/typecheck/mypy.txt; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info
