# Two entry points: `make demo` (set up + run the main job) and `make test` (set up + run tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
MODEL_CACHE := $(HOME)/.cache/nequix/models
export JAX_PLATFORMS ?= cpu

.PHONY: setup sysdeps models demo test docs lint bench clean

$(BIN)/nequix-fw: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (a local wheel where the machine has one), so nequix's torch backend does
	# not pull a multi-GB CUDA build; everything else comes from pyproject.toml.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.7"
	$(BIN)/pip install -q -e ".[dev,server,phonons,docs]"
	touch $@

setup: $(BIN)/nequix-fw

# System packages: CP2K (Debian's cp2k) for the CP2K labelling backend and its tests, Chromium
# (Debian's chromium) for the docs site's screenshots; a running one-node SLURM (the shared
# start script, as root) for the qlaunch test.
sysdeps:
	@command -v cp2k.psmp >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cp2k >/dev/null; } \
	  || echo "cp2k could not be installed: the CP2K tests will be skipped"
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; }; } \
	  || echo "chromium could not be installed: the docs screenshot test will be skipped"
	@sinfo >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && bash $(SHARED)/scripts/start-local-slurm.sh; } \
	  || echo "SLURM could not be started: the qlaunch test will be skipped"

# Foundation weights cannot be downloaded here: copy them into nequix's cache once.
models:
	@mkdir -p $(MODEL_CACHE)
	@for m in nequix-mp-1 nequix-oam-1; do \
	  [ -f $(MODEL_CACHE)/$$m.nqx ] || cp $(SHARED)/models/$$m.nqx $(MODEL_CACHE)/ ; done

# The main job: (1) the foundation models nequix-mp-1 + nequix-oam-1 rank a pool of structures;
# (2) a whole active-learning campaign through FireWorks (lpad/rlaunch) on the local MongoDB
# server, with real Nequix ensembles and EMT as the reference.
DEMO := demo_run
NFW := $(BIN)/nequix-fw
CFG := --config examples/demo_settings.yaml
demo: setup models
	@if [ -f $(DEMO)/db/server.json ]; then $(NFW) db stop --dir $(DEMO)/db >/dev/null; fi
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/python examples/make_structures.py initial $(DEMO)/initial_structures
	$(BIN)/python examples/make_structures.py candidates $(DEMO)/candidates
	$(BIN)/python examples/make_structures.py testset $(DEMO)/validation_set
	@echo "== foundation-model ensemble on the candidate pool"
	$(NFW) run-ensemble --models nequix-mp-1 nequix-oam-1 --structures $(DEMO)/candidates \
	  --output $(DEMO)/foundation_results.json
	$(NFW) select --ensemble $(DEMO)/foundation_results.json $(CFG) \
	  --output $(DEMO)/foundation_selected
	@echo "== the active-learning campaign (FireWorks on the local MongoDB server $(DEMO)/db)"
	$(NFW) db start --dir $(DEMO)/db --launchpad $(DEMO)/my_launchpad.yaml --name nequix_fw_demo
	cd $(DEMO) && ../$(NFW) campaign --config ../workflows/emt_cu_au.yaml \
	     --launchpad my_launchpad.yaml --write campaign_wf.yaml \
	  && ../$(BIN)/lpad -l my_launchpad.yaml reset --password $$(date +%Y-%m-%d) \
	  && ../$(BIN)/lpad -l my_launchpad.yaml add campaign_wf.yaml \
	  && ../$(BIN)/rlaunch -l my_launchpad.yaml rapidfire \
	  && ../$(NFW) campaign-status campaign; \
	  status=$$?; ../$(NFW) db stop --dir db; exit $$status
	@echo "(the database stays in $(DEMO)/db: nequix-fw db start --dir $(DEMO)/db to query it)"

# Two pytest workers (pytest-xdist), a test module each at a time: much of the suite waits on
# subprocesses (rlaunch, qlaunch/SLURM, CP2K, the database), so two run well on 2 cores.
test: setup sysdeps
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=25 tests

# The documentation site (docs/ -> site/), strict: a warning (a broken link, a missing page,
# a reference generator that fails) is an error.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup models
	$(BIN)/python benchmarks/bench_ensemble.py

clean:
	rm -rf $(DEMO) .pytest_cache
