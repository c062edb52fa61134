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
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: venv nginx postgres demo test test-fast lint docs bench clean

venv: $(STAMP)

# The coordinator's public front is nginx (a system package): the deployment tests start real ones.
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing nginx-light (the coordinator's public front) ..."; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; \
		else \
			echo "nginx is needed (the coordinator's public front): install it, e.g. sudo apt-get install nginx-light" >&2; \
			exit 1; \
		fi; }

# The run store's tests start a throwaway PostgreSQL server from the machine's binaries (tests/pg.py); Debian's
# package puts them in /usr/lib/postgresql/<version>/bin and creates the `postgres` user they run as under root.
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing postgresql (the run store's PostgreSQL tests) ..."; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
		else \
			echo "PostgreSQL is needed (the run store's tests): install it, e.g. sudo apt-get install postgresql" >&2; \
			exit 1; \
		fi; }

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=77" wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,postgres]"
	touch $(STAMP)

# The main job: a federated simulation on freshly generated phantom data. Three virtual hospitals
# (each its own scanner vendor and patient mix) pre-train echo_vit_tiny by masked autoencoding,
# then fine-tune it for EF, through Flower's simulation engine; the run lives in a SQLite store
# (demo-output/state). It ends with the comparison on every site's TEST videos (federated, each site
# alone, pooled, the mean predictor), an HTML report and predictions for one site's videos.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/fedecho synth $(DEMO_DIR)/phantom --videos 240 --sites 3 --seed 20 --max-frames 64
	$(BIN)/fedecho sim --config configs/quickstart.toml --data $(DEMO_DIR)/phantom --state $(DEMO_DIR)/state --compare
	$(BIN)/fedecho report 1 --state $(DEMO_DIR)/state --out $(DEMO_DIR)/report
	$(BIN)/fedecho predict $(DEMO_DIR)/phantom/site01/Videos --out $(DEMO_DIR)/predictions.csv \
		--checkpoint $$(ls $(DEMO_DIR)/state/checkpoints/run-0001/finetune-round-*.safetensors | grep -v strategy | tail -n 1)

# The user manual is built first, strictly: a broken link, a missing page or a reference page that no longer
# matches the code fails the tests (docs/hooks.py generates those pages from the code).
test: $(STAMP) nginx postgres
	d=$$(mktemp -d) && $(BIN)/mkdocs build --strict --quiet -d $$d/site; s=$$?; rm -rf $$d; exit $$s
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# While working: the tests not marked slow (under 2 minutes on 2 cores); `make test` stays the full suite.
test-fast: $(STAMP) postgres
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

# The user manual (MkDocs, Material theme) into site/; the reference pages are generated from the code.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every benchmark with its defaults (hours on 2 CPU cores, mostly local_training's pre-training; each
# script resumes or reuses its work folder under bench/work), then one table: bench/results/latest.json.
bench: $(STAMP)
	$(BIN)/python bench/mae_step.py
	$(BIN)/python bench/finetune_step.py
	$(BIN)/python bench/dp_step.py
	$(BIN)/python bench/data_loader.py
	$(BIN)/python bench/ddp_step.py --device cpu --devices 1,2 --model echo_vit_tiny --batch 8 --steps 6
	$(BIN)/python bench/dicom_ingest.py
	$(BIN)/python bench/federation.py
	$(BIN)/python bench/federated_accuracy.py --seeds 0,1
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/local_training.py --videos 300 --unlabeled 600 --pretrain-epochs 60 --seeds 0,1 --threads 1
	$(BIN)/python bench/local_training.py --videos 800 --unlabeled 600 --pretrain-epochs 60 --seeds 0,1 --threads 1 \
		--few-labels-only --out bench/results/local_training_few_labels.json
	$(BIN)/python bench/phantom_learnability.py
	$(BIN)/python bench/summary.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache site
