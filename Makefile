# Two entry points: `make demo` (set up + run the main job) and `make test` (set up + run tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
MODEL_CACHE := $(HOME)/.cache/nequix/models
export JAX_PLATFORMS ?= cpu

.PHONY: setup sysdeps models demo test lint bench clean

$(BIN)/nequix-fw: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (a local wheel where the machine has one), so nequix's torch backend does
	# not pull a multi-GB CUDA build; everything else comes from pyproject.toml.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.7"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/nequix-fw

# System packages: CP2K (Debian's cp2k) for the CP2K labelling backend and its tests.
sysdeps:
	@command -v cp2k.psmp >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cp2k >/dev/null; } \
	  || echo "cp2k could not be installed: the CP2K tests will be skipped"

# Foundation weights cannot be downloaded here: copy them into nequix's cache once.
models:
	@mkdir -p $(MODEL_CACHE)
	@for m in nequix-mp-1 nequix-oam-1; do \
	  [ -f $(MODEL_CACHE)/$$m.nqx ] || cp $(SHARED)/models/$$m.nqx $(MODEL_CACHE)/ ; done

# The main job: (1) the foundation models nequix-mp-1 + nequix-oam-1 rank a pool of structures;
# (2) one active-learning iteration by hand with real Nequix ensembles and EMT as the reference.
DEMO := demo_run
NFW := $(BIN)/nequix-fw
CFG := --config examples/demo_settings.yaml
demo: setup models
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/python examples/make_structures.py initial $(DEMO)/initial_structures
	$(BIN)/python examples/make_structures.py candidates $(DEMO)/candidates
	$(BIN)/python examples/make_structures.py testset $(DEMO)/validation_set
	@echo "== foundation-model ensemble on the candidate pool"
	$(NFW) run-ensemble --models nequix-mp-1 nequix-oam-1 --structures $(DEMO)/candidates \
	  --output $(DEMO)/foundation_results.json
	$(NFW) select --ensemble $(DEMO)/foundation_results.json $(CFG) \
	  --output $(DEMO)/foundation_selected
	@echo "== iteration 0: label the initial pool, train a 4-member ensemble"
	$(NFW) label $(CFG) --structures $(DEMO)/initial_structures --output $(DEMO)/labels_0 --iteration 0
	$(NFW) update-dataset --new $(DEMO)/labels_0 --dataset $(DEMO)/training_set --iteration 0
	$(NFW) train-ensemble $(CFG) --dataset $(DEMO)/training_set --outdir $(DEMO)/models_0
	$(NFW) validate --models $(DEMO)/models_0/member_*.nqx --testset $(DEMO)/validation_set \
	  --output $(DEMO)/validation_0.json --no-plots
	@echo "== iteration 1: evaluate candidates, select, label, grow the set, retrain (warm start)"
	$(NFW) run-ensemble --models $(DEMO)/models_0/member_*.nqx --structures $(DEMO)/candidates \
	  --output $(DEMO)/ensemble_results_1.json
	$(NFW) select --ensemble $(DEMO)/ensemble_results_1.json $(CFG) --output $(DEMO)/selected_1
	$(NFW) label $(CFG) --structures $(DEMO)/selected_1 --output $(DEMO)/labels_1 --iteration 1
	$(NFW) update-dataset --new $(DEMO)/labels_1 --dataset $(DEMO)/training_set --iteration 1
	$(NFW) train-ensemble $(CFG) --dataset $(DEMO)/training_set --outdir $(DEMO)/models_1 \
	  --warm-start $(DEMO)/models_0
	$(NFW) validate --models $(DEMO)/models_1/member_*.nqx --testset $(DEMO)/validation_set \
	  --output $(DEMO)/validation_1.json --reference emt

test: setup sysdeps
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup models
	$(BIN)/python benchmarks/bench_ensemble.py

clean:
	rm -rf $(DEMO) .pytest_cache
