#!/usr/bin/env bash
# Build .venv-peers/ (repo root): torch 2.13.0 CPU, this project (editable) and the peer toolkits of
# benchmarks/requirements-peers.txt, for benchmarks/bench_train.py. Idempotent: a stamp file records
# a finished install (delete .venv-peers/ or the stamp to rebuild).
#
#   bash benchmarks/peer_env.sh                 # dictionary-learning only
#   PEERS_SAE_LENS=1 bash benchmarks/peer_env.sh   # also sae-lens (optional; large)
#
# Kept apart from .venv/ on purpose: the peers must never become project dependencies.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${PEERS_VENV:-.venv-peers}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
REQS=benchmarks/requirements-peers.txt
STAMP="$VENV/.peers-installed"
want="$(sha256sum "$REQS" pyproject.toml | sha256sum | cut -c1-16) sae_lens=${PEERS_SAE_LENS:-0} $TORCH_SPEC"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "peer_env: $VENV is up to date ($STAMP)"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# pip -q still prints a warning per missing local index folder; keep the output readable
pip_install() {
    "$VENV/bin/python" -m pip install -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_SPEC" > "$constraints"

pip_install --upgrade pip
pip_install "$TORCH_SPEC"
pip_install -c "$constraints" -e .
pip_install -c "$constraints" -r "$REQS"
if [[ "${PEERS_SAE_LENS:-0}" == "1" ]]; then
    pip_install -c "$constraints" sae-lens
fi
# nnsight (a dictionary-learning dependency) pulls a CUDA torchvision that breaks `import
# transformers` on CPU torch; nothing benchmarked needs it.
"$VENV/bin/python" -m pip uninstall -y -q torchvision 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, dictionary_learning  # noqa: F401
from importlib.metadata import version
print("peer_env: torch", torch.__version__, "| dictionary-learning", version("dictionary-learning"))
PY
echo "$want" > "$STAMP"
