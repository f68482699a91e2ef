# Two commands on a fresh machine:  `make demo` (main job)  and  `make test` (the default test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -m "not slow and not gpu"
LINT_PATHS := dbtr hydra_plugins tests benchmarks notebooks

.PHONY: help install demo toyclip test test-slow test-full lint format bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/dbtr-train: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/dbtr-train  ## create .venv and install dbtr with its dev extras

demo: install  ## main job: the toy world, every method trained on captions and tested on images, one table
	$(BIN)/dbtr-toyworld

toyclip: install  ## regenerate the shipped toy-world CLIP (dbtr/assets/toyclip) from scratch
	$(BIN)/python -m dbtr.toyworld.pretrain --out dbtr/assets/toyclip

test: install  ## the default test suite: fast, minutes (no slow, no gpu tests)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install  ## only the slow end-to-end proofs (DDP, kill-and-resume, sweeps, notebook, full demo)
	$(BIN)/python -m pytest -m "slow and not gpu"

test-full: install  ## every test, slow ones included
	$(BIN)/python -m pytest

lint: install  ## ruff: lint rules (pyproject [tool.ruff]) and the formatting check
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: install  ## rewrite in place: ruff format, then ruff's safe fixes (import order, pyupgrade)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

bench: install  ## performance ratios (printed)
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_cached_training.py
	$(BIN)/python benchmarks/bench_image_eval.py
	$(BIN)/python benchmarks/bench_coco_scale.py

clean:  ## remove runs and generated data
	rm -rf logs .toyworld .tiny
