#!/usr/bin/env bash
# The full benchmark run behind docs/benchmarks.md (about 2 hours on the 2-core development machine).
# Run it alone: a second busy process on the same cores distorts every timing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh" | tail -n 1)"
cd "$root"
out="${OUT:-docs/bench}"
"$venv/bin/python" -m ds_structopt.bench convergence --out "$out"
"$venv/bin/python" -m ds_structopt.bench step --models 60m 130m 350m 1b --whole-step-models 130m --plain-steps 2 --out "$out"
"$venv/bin/python" -m ds_structopt.bench dist --out "$out"
"$venv/bin/python" -m ds_structopt.bench refresh --out "$out"
# staggered (and refresh-ahead) vs synchronous refresh on the convergence suite, three seeds
for seed in 0 1 2; do
  "$venv/bin/python" -m ds_structopt.bench convergence --trials 1 --seed "$seed" --out "$out/stagger-seed$seed" \
    --optimizers AdamW "AdaDiag++" "AdaDiag++ staggered" "AdaDiag++ staggered+ahead"
done
# the distributed step as sampled ranks of 8-1024-GPU worlds (simulated; resumable; ~27 min on the Xeon host)
"$venv/bin/python" -m ds_structopt.bench scale --out "$out" --stages 2 3 --ownership flat
"$venv/bin/python" -m ds_structopt.bench scale --out "$out" --stages 2 --ownership node
# ZeRO-Offload step time vs none on 2 CPU ranks (resumable; ~12 min): docs/bench/offload/summary.json
bash scripts/bench_offload.sh "$out/offload"
