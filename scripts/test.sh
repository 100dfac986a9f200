#!/usr/bin/env bash
# The test command: set up the environment, then run the test suite (extra args go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh" | tail -n 1)"
bash "$root/scripts/install_system_deps.sh"
cd "$root"
"$venv/bin/python" -m ds_structopt.integrations.offload_ops  # offload's DeepSpeed ops, once per machine and venv (minutes)
exec "$venv/bin/python" -m pytest "$@"
