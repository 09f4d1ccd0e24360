# occscene-pl developer commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-gpu lint format demo bench clean

help:  ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev,cpu-fast]"
	@touch $(STAMP)

install: $(STAMP)  ## Create .venv in the repo root and install occscene-pl[dev,cpu-fast] into it

test: $(STAMP)  ## Run the default test suite (excludes slow and gpu tests)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)  ## Run the slow tests
	$(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-gpu: $(STAMP)  ## Run the GPU tests (needs CUDA)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

lint: $(STAMP)  ## Check formatting, lint (docstrings included) and types: the CI check, also the pre-commit hooks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

format: $(STAMP)  ## Format the code and apply safe lint fixes
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

DEMO_FIT = $(BIN)/occscene-pl fit --config configs/demo.yaml
last_ckpt = $$(ls -t runs/demo/$(1)/lightning_logs/version_*/checkpoints/last.ckpt 2>/dev/null | head -n 1)

demo: $(STAMP)  ## Generate the demo dataset, train OccScene on it in 3 stages, generate scenes (CPU, ~10 min, runs/demo/)
	@# Stage 1: the perceiver alone (paper: a pre-trained perception model). Stages are skipped when already trained.
	@if [ -z "$(call last_ckpt,1_perception)" ]; then set -x; $(DEMO_FIT) --model.mode perception \
		--trainer.default_root_dir runs/demo/1_perception --trainer.max_steps 100 --trainer.val_check_interval 100; fi
	@# Stage 2: UNet + MDA on ground-truth layouts, perceiver frozen (docs/design.md §2.2: stage 1 of the generator).
	@if [ -z "$(call last_ckpt,2_generation)" ]; then set -x; $(DEMO_FIT) --model.mode generation \
		--model.init_from "$(call last_ckpt,1_perception)" --trainer.default_root_dir runs/demo/2_generation \
		--trainer.max_steps 260 --trainer.val_check_interval 260; fi
	@# Stage 3: OccScene joint training (mutual learning), from stage 2. The stage-1 perceiver, which never saw a
	@# generated image, is the frozen judge of generated scenes (consistency_miou) in validation and predict.
	@if [ -z "$(call last_ckpt,3_joint)" ]; then set -x; $(DEMO_FIT) --model.mode joint \
		--model.init_from "$(call last_ckpt,2_generation)" --trainer.default_root_dir runs/demo/3_joint \
		--model.evaluation.judge "$(call last_ckpt,1_perception)" \
		--trainer.max_steps 15 --trainer.val_check_interval 15; fi
	$(BIN)/occscene-pl predict --config configs/demo.yaml --ckpt_path "$(call last_ckpt,3_joint)" \
		--model.evaluation.judge "$(call last_ckpt,1_perception)" --data.prompts configs/demo_prompts.txt
	$(BIN)/occscene-pl predict --config configs/demo.yaml --ckpt_path "$(call last_ckpt,3_joint)" \
		--model.evaluation.judge "$(call last_ckpt,1_perception)" --model.sampling.predict_mode layout \
		--data.predict_limit 8
	$(BIN)/python -m occscene_pl.summarize runs/demo/samples
	@echo "demo: generated scenes in runs/demo/samples/ (image.png, occupancy.png, occupancy.npz, meta.json, summary.json)"

bench: $(STAMP)  ## Run the benchmarks, results as JSON in bench-results/
	@mkdir -p bench-results
	$(BIN)/python benchmarks/run.py --out bench-results

clean:  ## Remove caches, build artefacts and runs/ (keeps .venv)
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache runs lightning_logs bench-results
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
