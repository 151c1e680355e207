#!/usr/bin/env bash
# Build .venv-peers/ (repo root): torch 2.13.0 CPU, this project (editable) and the peer toolkits of
# benchmarks/requirements-peers.txt (dictionary-learning, sae-lens, eai-sparsify), for the peer
# comparisons and format checks (benchmarks.bench_train, benchmarks.bench_peers_*,
# benchmarks.check_*). Idempotent: a stamp file records a finished install (delete .venv-peers/ or
# the stamp to rebuild).
#
#   bash benchmarks/peer_env.sh && .venv-peers/bin/python -m benchmarks.bench_train
#
# Kept apart from .venv/ on purpose: the peers must never become project dependencies.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${PEERS_VENV:-.venv-peers}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
REQS=benchmarks/requirements-peers.txt
STAMP="$VENV/.peers-installed"
want="$(sha256sum "$REQS" pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC"

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
# nnsight (a dictionary-learning dependency) pulls a CUDA torchvision that breaks `import
# transformers` on CPU torch; nothing benchmarked needs it.
"$VENV/bin/python" -m pip uninstall -y -q torchvision 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, dictionary_learning, sae_lens, sparsify  # noqa: F401
from importlib.metadata import version
print("peer_env: torch", torch.__version__, *(f"| {p} {version(p)}" for p in
      ("dictionary-learning", "sae-lens", "eai-sparsify")))
PY
echo "$want" > "$STAMP"
