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
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## Create .venv in the repo root and install occscene-pl[dev] into it

test: $(STAMP)  ## Run the default test suite (excludes slow and gpu tests)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)  ## Run the slow tests
	$(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-gpu: $(STAMP)  ## Run the GPU tests (needs CUDA)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

lint: $(STAMP)  ## Check formatting, lint and types
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

format: $(STAMP)  ## Format the code and apply safe lint fixes
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

DEMO_LAST = ls -t runs/demo/lightning_logs/version_*/checkpoints/last.ckpt 2>/dev/null | head -n 1

demo: $(STAMP)  ## Generate the demo dataset, train OccScene on it, generate scenes (CPU, ~10 min, runs/demo/)
	@if [ -n "$$($(DEMO_LAST))" ]; then echo "demo: $$($(DEMO_LAST)) exists, skipping training (make clean to retrain)"; \
	else $(BIN)/occscene-pl fit --config configs/demo.yaml; fi
	$(BIN)/occscene-pl predict --config configs/demo.yaml --ckpt_path "$$($(DEMO_LAST))" \
		--data.prompts configs/demo_prompts.txt
	$(BIN)/occscene-pl predict --config configs/demo.yaml --ckpt_path "$$($(DEMO_LAST))" \
		--model.sampling.predict_mode layout --data.predict_limit 8
	@echo "demo: generated scenes in runs/demo/samples/ (image.png, occupancy.png, occupancy.npz, meta.json)"

bench: $(STAMP)  ## Run the benchmarks, results as JSON in bench-results/
	@mkdir -p bench-results
	$(BIN)/python benchmarks/run.py --out bench-results

clean:  ## Remove caches, build artefacts and runs/ (keeps .venv)
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache runs lightning_logs bench-results
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
