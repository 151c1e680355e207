#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): every stage on SmolLM2-135M- and Pythia-160M-shaped
# random-weight models, as a pass/fail table. On a fresh GPU machine with this repository checked
# out it needs Python >= 3.11 with venv, and the package registries (PyPI) only: no model hub.
#
#   bash benchmarks/gpu_check.sh                 # sets up .venv (or VENV=...), then runs the check
#   bash benchmarks/gpu_check.sh --json out.json # arguments go to the check; --small: CPU sizes
#
# With a GPU (nvidia-smi lists one), the venv gets the CUDA build of the torch version pinned in
# pyproject.toml: PyPI's Linux wheels of torch are CUDA builds (they pull the nvidia-* runtime
# wheels), so the default index serves it; a venv that holds a CPU build of the pin (e.g. from
# `make setup` on a CPU machine) has it replaced. Then the project itself (pip install -e .).
# Without a GPU it runs the small CPU sizes. On a GPU it passes --strict: exit status 1 when a
# check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
TORCH_VERSION=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
[ -n "$TORCH_VERSION" ] || { echo "no torch==<version> pin found in pyproject.toml" >&2; exit 2; }

if [ ! -x "$PY" ]; then
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
fi

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then gpu=1; fi
has_torch() {  # $1 = 1: it must see CUDA
    "$PY" - "$TORCH_VERSION" "$1" <<'PYEOF' 2>/dev/null
import sys, torch
ok = torch.__version__.split("+")[0] == sys.argv[1] and (sys.argv[2] == "0" or torch.cuda.is_available())
sys.exit(0 if ok else 1)
PYEOF
}
if ! has_torch "$gpu"; then
    if [ "$gpu" = 1 ]; then
        echo "installing torch==$TORCH_VERSION (CUDA build) from the default index" >&2
        "$PY" -m pip uninstall -q -y torch 2>/dev/null || true
    fi
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
if [ "$gpu" = 1 ] && ! has_torch 1; then
    echo "torch==$TORCH_VERSION is installed but sees no GPU: check the driver (nvidia-smi) and that the" >&2
    echo "index serves the CUDA wheel (PyPI does; a CPU-only mirror in PIP_INDEX_URL does not)." >&2
    exit 2
fi
"$PY" -c "import mdiff, zarr, transformers" 2>/dev/null || "$PY" -m pip install -q -e .

args=("$@")
if [ "$gpu" = 1 ]; then args=(--strict "${args[@]}"); fi
exec "$PY" -m benchmarks.gpu_check "${args[@]}"
