#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned CPU torch and the package installed editable.
# Safe to re-run: it only installs what is missing. Override the location with VENV=...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.ds_structopt-installed"
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
if [[ ! -f "$stamp" || "$root/pyproject.toml" -nt "$stamp" || "$root/constraints.txt" -nt "$stamp" ]]; then
    export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
    # torch first, from the pin, so nothing later can pull a multi-GB CUDA build.
    "$venv/bin/pip" install -q -c "$root/constraints.txt" torch
    "$venv/bin/pip" install -q -c "$root/constraints.txt" -e "$root[test,mpi,bench,hf,megatron]"
    touch "$stamp"
fi
echo "$venv"
