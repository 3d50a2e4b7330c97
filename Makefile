# Entry points a new user runs; each installs the pinned environment first (tools/install.sh).
# PYTHON: the interpreter (a command, a path or a version such as 3.13); empty, install.sh takes
# Python 3.12, else 3.13, else 3.11. VENV (or CONCEPT_VENV): the virtualenv, rebuilt when the
# interpreter or its lock changes.
PYTHON ?=
VENV ?= $(or $(CONCEPT_VENV),.venv)
# LEAN=1: install the runtime lock only (requirements-runtime-py3.X.lock: no pytest, moto, lamindb,
# wandb), for make install / make demo; make test needs the full lock
LEAN ?=
PY := $(VENV)/bin/python
# make test also runs the fast tests of ALSO_TESTS on this Python version, in its own venv
# (.venv-3.11); set it empty to skip. Not found, it is skipped with a notice, except under CI
# (CI=true), where it fails. ALSO_TESTS: the tests whose libraries differ between the versions'
# locks (anndata 0.12/0.13, pandas 2/3, zarr, scipy): reading sources, sharding, embedding into
# .h5ad, AnnData objects, CSV panels, the example project's files, a foreign config's build, lamindb
# over pandas 2 (the model
# and trainer tests run the same torch on every version; S3 (boto3, moto), the wheel, the config
# composition of the docs and of scConcept's trees use the same versions on both), in groups as
# SUITES (one pytest process each, a group in double quotes); ALSO_TESTS=tests for the whole fast
# suite in one process (about 5 minutes more).
ALSO_PYTHON ?= 3.11
# tests/shard in two groups: the first holds the tests that compare whole builds (each reads ~20
# datasets back with streaming; see SUITES below)
SHARD_BUILDS := tests/shard/test_array_tasks.py tests/shard/test_build_resume.py
SHARD_OTHERS := tests/shard $(SHARD_BUILDS:%=--ignore=%)
# of those, the ones whose libraries are the same on every version (locks, hashes of shard files,
# shell scripts): not run again on ALSO_PYTHON
SHARD_SAME := tests/shard/test_concurrent_builds.py tests/shard/test_integrity.py tests/shard/test_slurm_and_config.py
# (of tests/train/scconcept, the fixtures read with 3.11's anndata and the API's adaptation from an
# AnnData object read from a file, which found anndata 0.12's string-array refusal)
SCCONCEPT_ALSO := tests/train/scconcept/test_scconcept_models.py::test_embeddings_equal_scconcepts_own tests/train/scconcept/test_scconcept_models.py::test_scconcept_api_names
ALSO_E2E := tests/e2e/test_example_project.py tests/e2e/test_foreign_config.py tests/e2e/test_lamin.py
ALSO_TESTS ?= "$(SHARD_OTHERS) $(SHARD_SAME:%=--ignore=%) $(ALSO_E2E) tests/train/test_embed.py tests/train/test_api_train.py tests/train/data/test_data_panels.py $(SCCONCEPT_ALSO)" "$(SHARD_BUILDS)"
# test-fast runs these (default: all of tests/)
TESTS ?=
EXAMPLE ?= example_project

.PHONY: install demo test test-fast lint bench

install:
	CONCEPT_VENV=$(VENV) PYTHON=$(PYTHON) CONCEPT_LEAN=$(LEAN) bash tools/install.sh

# The main job on the bundled example project: build it, shard it, derive co-expression gene
# vectors from its training shards, pre-train a small model on
# the CPU for a few minutes (conf/experiment/demo.yaml), print where the run, curves and checkpoint are,
# then evaluate it on the validation cells against PCA(50) (concept-eval: the table, umap.png).
demo: install
	$(PY) tools/make_example_project.py $(EXAMPLE)
	$(VENV)/bin/concept-shard build $(EXAMPLE) datamodule=DataModuleAdvanced
	$(VENV)/bin/concept-shard gene-vectors $(EXAMPLE)
	$(VENV)/bin/concept-train $(EXAMPLE) +experiment=demo
	$(VENV)/bin/concept-eval "$$(ls -dt $(EXAMPLE)/model_checkpoints/*/ | head -n 1)"

# ruff (lint), then the whole suite, slow end-to-end tests included, and the fast tests of ALSO_TESTS on
# $(ALSO_PYTHON) (this is what CI runs): one pytest process per group of SUITES and ALSO_TESTS,
# TEST_JOBS at a time, longest first (tools/run_suites.py; each group's output is printed whole when
# it ends). CONCEPT_VENV tells the tests that run the SLURM scripts which venv to use.
# One pytest process per group: mosaicml-streaming keeps a handle on the shared memory of every
# live dataset each time a StreamingDataset is built, so descriptors grow with the square of the
# datasets one process builds, and the whole suite in one process passed the 20,000 limit
# ("Too many open files"); tests/shard alone came close. The example project and its shards are
# built once for all of them (tests/helpers.py: cached_copy, in .pytest_cache/d/concept-fixtures/).
# Listed longest first: the order a first run (no times recorded yet) starts them in.
E2E_RUNS := tests/e2e/test_end_to_end.py tests/e2e/test_chaos.py
SUITES ?= tests/train/trainer tests/train/data "$(E2E_RUNS)" "tests/e2e $(E2E_RUNS:%=--ignore=%)" "tests/train/model tests/train/test_api_train.py tests/train/test_embed.py tests/train/eval tests/train/scconcept" "$(SHARD_OTHERS)" "$(SHARD_BUILDS)"
# groups run side by side (default: 2, the cores of the machine the suite time is measured on)
TEST_JOBS ?= 2

# ruff's lint and format check over the packages, tests and tools (pyproject.toml [tool.ruff])
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	@also=; \
	if [ -n "$(ALSO_PYTHON)" ] && [ "$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$(ALSO_PYTHON)" ]; then \
	  if PYTHON=$(ALSO_PYTHON) bash tools/install.sh --print-python >/dev/null; then \
	    $(MAKE) --no-print-directory install PYTHON=$(ALSO_PYTHON) VENV=.venv-$(ALSO_PYTHON) || exit 1; \
	    also="--venv .venv-$(ALSO_PYTHON) --marker"; \
	  elif [ "$${CI:-}" = true ]; then exit 1; \
	  else echo "[test] skipped the fast suite on Python $(ALSO_PYTHON): none found (CI runs it; ALSO_PYTHON= hides this)"; fi; \
	fi; \
	if [ -n "$$also" ]; then \
	  $(PY) tools/run_suites.py --jobs $(TEST_JOBS) --venv $(VENV) $(SUITES) $$also "not slow" $(ALSO_TESTS); \
	else \
	  $(PY) tools/run_suites.py --jobs $(TEST_JOBS) --venv $(VENV) $(SUITES); \
	fi

test-fast: install
	@rc=0; for suite in $(if $(TESTS),"$(TESTS)",$(SUITES)); do \
	  echo "[test-fast] $$suite"; CONCEPT_VENV=$(VENV) $(PY) -m pytest -q --durations=8 -m "not slow" $$suite || rc=1; \
	done; exit $$rc

bench: install
	$(PY) tools/bench/shard.py
	$(PY) tools/make_example_project.py /tmp/concept_loader_bench
	$(VENV)/bin/concept-shard build /tmp/concept_loader_bench --no-progress
	$(PY) tools/bench/loader.py /tmp/concept_loader_bench
	$(PY) tools/bench/model.py /tmp/concept_loader_bench --threads 1 --configs tiny
