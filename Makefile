# One target per stage; each takes CONFIG=<experiment file> where it makes sense.
#   make demo                      offline run on tiny local models (no download)
#   make cache CONFIG=configs/pythia-1b-checkpoints.toml
#   make test                      builds its own environment from scratch, then runs pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On this project's CPU machines torch==2.13.0 is a local wheel; on a GPU box, override with the
# CUDA build you want, e.g. make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= runs/smoke/experiment.toml
STAMP := $(VENV)/.mdiff-installed

.PHONY: setup cache train eval report all demo smoke status verify test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

cache: setup
	$(BIN)/mdiff cache $(CONFIG)

train: setup
	$(BIN)/mdiff train $(CONFIG)

eval: setup
	$(BIN)/mdiff eval $(CONFIG)

# Several experiments at once: make report CONFIG="a.toml b.toml"
report: setup
	$(BIN)/mdiff report $(CONFIG)

all: cache train eval report

status: setup
	$(BIN)/mdiff status $(CONFIG)

verify: setup
	$(BIN)/mdiff verify $(CONFIG)

# The offline default: tiny random-weight models and generated text, built locally, then the whole
# pipeline (cache, train, eval, report), then the store listed and verified.
demo: setup
	$(BIN)/mdiff smoke runs/smoke
	$(BIN)/mdiff status runs/smoke/experiment.toml
	$(BIN)/mdiff verify runs/smoke/experiment.toml

smoke: demo

test: setup
	$(BIN)/python -m pytest

# Each benchmark rewrites its own section of BENCHMARKS.md and a JSON file of raw figures.
# The training comparison runs in a separate environment holding the peer toolkits.
bench: setup
	$(BIN)/python benchmarks/bench_cache.py --out BENCHMARKS.md
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_eval.py
	bash benchmarks/peer_env.sh
	.venv-peers/bin/python benchmarks/bench_train.py

clean:
	rm -rf runs/smoke .pytest_cache
