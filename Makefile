# Entry points a new user runs; each installs the pinned environment first (tools/install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
EXAMPLE ?= example_project

.PHONY: install demo test test-fast bench

install:
	bash tools/install.sh

# The main job on the bundled example project: build it, shard it, derive co-expression gene
# vectors from its training shards, pre-train a small model on
# the CPU for a few minutes (conf/experiment/demo.yaml), print where the run, curves and checkpoint are.
demo: install
	$(PY) tools/make_example_project.py $(EXAMPLE)
	$(VENV)/bin/concept-shard build $(EXAMPLE) datamodule=DataModuleAdvanced
	$(VENV)/bin/concept-shard gene-vectors $(EXAMPLE)
	$(VENV)/bin/concept-train $(EXAMPLE) +experiment=demo

# The whole suite, slow end-to-end tests included (this is what CI runs).
test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) tools/bench/shard.py
	$(PY) tools/make_example_project.py /tmp/concept_loader_bench
	$(VENV)/bin/concept-shard build /tmp/concept_loader_bench --no-progress
	$(PY) tools/bench/loader.py /tmp/concept_loader_bench
	$(PY) tools/bench/model.py /tmp/concept_loader_bench --threads 1 --configs tiny
