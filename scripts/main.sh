#!/usr/bin/env bash
# The main job: set up the environment, then train the tiny LLaMA on the embedded corpus
# (Python's own docs, byte tokens) with AdaDiag++ at ZeRO-2 on 2 CPU ranks through the
# real `deepspeed` launcher. Extra args go to the training entry point (ds_structopt.train).
# Re-running it starts the demo over in runs/main (--overwrite); pass --resume to continue instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh" | tail -n 1)"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # 2 ranks on a small CPU: one thread each
exec "$venv/bin/deepspeed" --num_gpus "${NUM_RANKS:-2}" --module ds_structopt.train \
    --model tiny --deepspeed_config configs/ds_tiny_adadiagpp_zero2.json \
    --steps 300 --output-dir runs/main $([[ " $* " == *" --resume "* ]] || echo --overwrite) "$@"
