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
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=77" wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The main job, growing with the project. Now: a 3-site phantom (EchoNet layout) and a small
# hospital-style DICOM archive read back through the data layer, then local pre-training and
# EF fine-tuning of echo_vit_tiny on one site, and a prediction on a DICOM cine.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/fedecho synth $(DEMO_DIR)/phantom --videos 90 --sites 3 --seed 0
	$(BIN)/fedecho synth $(DEMO_DIR)/archive --videos 4 --format dicom --seed 1
	$(BIN)/fedecho data inspect $(DEMO_DIR)/phantom --cache $(DEMO_DIR)/cache
	$(BIN)/fedecho data inspect $(DEMO_DIR)/archive --cache $(DEMO_DIR)/cache
	$(BIN)/fedecho train pretrain --config configs/demo.toml --out $(DEMO_DIR)/runs/pretrain
	$(BIN)/fedecho train finetune --config configs/demo.toml --out $(DEMO_DIR)/runs/finetune \
		--init $(DEMO_DIR)/runs/pretrain/model.safetensors
	$(BIN)/fedecho predict $$(ls $(DEMO_DIR)/archive/files/*/*/*/*_0001.dcm | head -n 1) \
		--checkpoint $(DEMO_DIR)/runs/finetune/model.safetensors

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/phantom_learnability.py
	$(BIN)/python bench/local_training.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
