# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv; the install is skipped when pyproject.toml and
# constraints.txt have not changed since the last one.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedecho-installed
DEMO_DIR ?= demo-output

export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=69" wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedecho demo --out $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
