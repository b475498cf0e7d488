# Two entry points: `make demo` (set up + run the main job) and `make test` (set up + run tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
MODEL_CACHE := $(HOME)/.cache/nequix/models
export JAX_PLATFORMS ?= cpu

.PHONY: setup models demo test lint bench clean

$(BIN)/nequix-fw: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (a local wheel where the machine has one), so nequix's torch backend does
	# not pull a multi-GB CUDA build; everything else comes from pyproject.toml.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.7"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/nequix-fw

# Foundation weights cannot be downloaded here: copy them into nequix's cache once.
models:
	@mkdir -p $(MODEL_CACHE)
	@for m in nequix-mp-1 nequix-oam-1; do \
	  [ -f $(MODEL_CACHE)/$$m.nqx ] || cp $(SHARED)/models/$$m.nqx $(MODEL_CACHE)/ ; done

demo: setup models
	rm -rf demo_run && mkdir -p demo_run
	$(BIN)/python examples/make_structures.py demo_run/initial_structures
	$(BIN)/nequix-fw run-ensemble --models nequix-mp-1 nequix-oam-1 \
	  --structures demo_run/initial_structures --output demo_run/ensemble_results.json
	$(BIN)/nequix-fw select --ensemble demo_run/ensemble_results.json --lo 0.05 --hi 1.5 \
	  --max-selected 8 --diverse --min-distance 1.6 --output demo_run/selected_structures

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup models
	$(BIN)/python benchmarks/bench_ensemble.py

clean:
	rm -rf demo_run .pytest_cache
