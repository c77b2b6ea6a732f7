# sid: `make demo` and `make test` are all a newcomer needs; each target installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.dev-installed-stamp
SID_DATA_ROOT ?= $(abspath ../shared/data)
export SID_DATA_ROOT
TEST_ENV := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: install demo test test-gpu lint fmt data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

# Test tools and the parity oracles (torch CPU, transformers): only `make test` and `make lint` need them.
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

# The main job on the embedded synthetic catalog: train a small Qwen2 from scratch, then rank its test split.
# Each run starts afresh: the previous demo run in runs/demo is replaced.
DEMO_DIR := runs/demo
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/python -m sid.train --config configs/train/cpu/demo.yaml --train.output-dir $(DEMO_DIR)

test: $(DEV_STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q tests

# The GPU-only tests (marked `gpu`: cuDNN attention), on a machine with a GPU and jax[cuda]: the real devices, not the
# 8 simulated CPU ones `make test` uses (there these tests skip).
test-gpu: $(DEV_STAMP)
	SID_TEST_DEVICE=gpu $(BIN)/python -m pytest -q -m gpu tests

lint: $(DEV_STAMP)
	$(BIN)/ruff check sid tests bench
	$(BIN)/ruff format --check sid tests bench

fmt: $(DEV_STAMP)
	$(BIN)/ruff check --fix sid tests bench
	$(BIN)/ruff format sid tests bench

# For users with internet: upstream MiniOneRec, linked into the flat layout the readers expect
# (workdir/data/minionerec_industrial/{train,valid,test}.csv, info.txt, *.index.json, *.item.json).
# This team's machines use ../shared/data instead (its train CSV is partial: train_partial.csv).
MINIONEREC := workdir/MiniOneRec/data/Amazon
CATEGORY ?= Industrial_and_Scientific
SPLIT_STEM ?= $(CATEGORY)_5_2016-10-2018-11
data:
	mkdir -p workdir/data/minionerec_industrial
	test -d workdir/MiniOneRec || git clone --depth 1 https://github.com/AkaliKong/MiniOneRec workdir/MiniOneRec
	cd workdir/data/minionerec_industrial && for s in train valid test; do \
		ln -sf ../../../$(MINIONEREC)/$$s/$(SPLIT_STEM).csv $$s.csv; done && \
		ln -sf ../../../$(MINIONEREC)/info/$(SPLIT_STEM).txt info.txt && \
		ln -sf ../../../$(MINIONEREC)/index/$(CATEGORY).index.json $(CATEGORY).index.json && \
		ln -sf ../../../$(MINIONEREC)/index/$(CATEGORY).item.json $(CATEGORY).item.json
	@echo "Now: export SID_DATA_ROOT=$(abspath workdir/data) and train with --data.train-file train.csv"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

include ops/ops.mk

# Recommendation quality against the published LETTER Instruments table (docs/benchmarks.md, section 6):
# MODE=gpu (default: the GPU preset, seeds 0-2), cpu (a tiny model on 500 users), tiny (seconds) or industrial;
# QUALITY_ARGS adds bench/quality.py options, e.g. QUALITY_ARGS="--variants base:0-2 wide:0 --parallel 4".
MODE ?= gpu
QUALITY_ARGS ?=
.PHONY: bench-quality
bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py --mode $(MODE) $(QUALITY_ARGS)

# SIDs for MiniOneRec Industrial from collaborative embeddings of its train CSV (RQ-KMeans, 3 levels x 256 codes):
# a complete dataset directory (index, item.json, info.txt, CSVs with the new SID columns) in $(SIDS_DIR).
SIDS_DIR ?= runs/sids/minionerec_industrial
.PHONY: sids
sids: $(STAMP)
	$(BIN)/python -m sid.index --config configs/index/industrial.yaml --output.dir $(SIDS_DIR)
