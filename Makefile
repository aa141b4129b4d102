# unirl — the two commands that do everything on a fresh machine:
#   make demo   # set up .venv and run the whole pipeline on the tiny profile (CPU)
#   make test   # set up .venv and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/.dagster
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?= -m "not gpu"

.PHONY: setup demo pipeline test lint ui mlflow-ui bench gpu-check clean

setup: $(STAMP)

# constraints.txt pins the whole resolved environment (made with `pip freeze`), pyproject.toml the direct dependencies.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	mkdir -p $(DAGSTER_HOME) $(TORCH_EXTENSIONS_DIR) mlflow data
	touch $@

demo: setup pipeline

# The pipeline: `dvc repro` runs every stage of dvc.yaml with params.yaml (the same entry points Dagster calls);
# stages whose inputs did not change are skipped.
pipeline: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	@echo
	@test -f data/eval/table.md && cat data/eval/table.md || true
	@echo "Done. Browse the assets:  make ui         (Dagster, http://127.0.0.1:3000)"
	@echo "      Runs and models:    make mlflow-ui  (MLflow,  http://127.0.0.1:5000)"
	@echo "      Metrics:            .venv/bin/dvc metrics show"

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) -q -ra --durations=15

lint: setup
	$(VENV)/bin/ruff check .

ui: setup
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p 3000

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db \
		--default-artifact-root $(CURDIR)/mlflow/artifacts -h 127.0.0.1 -p 5000

# CPU benchmarks (each prints ratios measured side by side in one run; the last line of each is JSON).
bench: setup
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	$(PY) bench/curate.py
	$(PY) bench/verifier_accuracy.py
	$(PY) bench/sft.py
	$(PY) bench/dm_rl.py
	$(PY) bench/lm_grpo.py
	@if [ -d data/models/vae ]; then $(PY) bench/dit_shape_ceiling.py; \
	else $(PY) bench/dit_shape_ceiling.py --spaces pixel; fi
	@if [ -d data/models/sft ]; then $(PY) bench/sft_conditioning.py; \
	else echo 'bench/sft_conditioning.py skipped: no data/models/sft (run make pipeline first)'; fi

# On a CUDA machine: the gpu-marked tests, then one full-scale t2i GRPO step at 512 and at 1024 px
# (random weights, nothing downloaded; README, "Full scale on one GPU").
gpu-check: setup
	$(PY) -m pytest -m gpu -q -ra tests/test_gpu.py
	$(PY) bench/gpu_full_scale.py
	$(PY) bench/gpu_full_scale.py --resolution 1024 --replay-chunk 32

clean:
	rm -rf data/shards data/tokenizer data/models data/eval .dagster/storage
