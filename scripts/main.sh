#!/usr/bin/env bash
# The main job: set up the environment, then train a tiny LLaMA on text shipped with Python
# with AdaDiag++ and with AdamW, printing both losses (extra args go to the demo).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh" | tail -n 1)"
cd "$root"
exec "$venv/bin/python" -m ds_structopt.demo "$@"
