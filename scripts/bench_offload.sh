#!/usr/bin/env bash
# ZeRO-Offload step time against no offload: the entry point on 2 CPU ranks (deepspeed launcher,
# gloo, DeepSpeed's CPU accelerator), 60m LLaMA, AdaDiag++, ZeRO-2 and ZeRO-3, with and without
# "offload_optimizer": {"device": "cpu"}; tokens/s after the first (compiling) steps, from each
# run's result.json, and the final eval loss of each pair. Resumable: a finished run is skipped.
# Usage: bash scripts/bench_offload.sh [OUT_DIR]   (about 10 min here)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/bench/offload}"
python=".venv/bin/python"
mkdir -p "$out"
for stage in 2 3; do
    for mode in none cpu; do
        run="$out/zero${stage}_$mode"
        if [[ -f "$run/result.json" ]]; then echo "$run: cached"; continue; fi
        "$python" - "$stage" "$mode" "$out/zero${stage}_$mode.json" <<'EOF'
import json, sys
cfg = json.load(open("configs/ds_tiny_adadiagpp_zero2.json"))
cfg["zero_optimization"] = {"stage": int(sys.argv[1])}
if sys.argv[2] == "cpu":
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
json.dump(cfg, open(sys.argv[3], "w"), indent=1)
EOF
        OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/deepspeed --num_gpus 2 --module ds_structopt.train --model 60m \
            --deepspeed_config "$out/zero${stage}_$mode.json" --steps 40 --eval-every 40 --save-every 1000 \
            --log-every 10 --output-dir "$run" > "$run.log" 2>&1 || { tail -20 "$run.log"; exit 1; }
        rm -rf "$run/checkpoints" "$run/tensorboard"  # hundreds of MB each; the figures are in metrics.csv/result.json
        echo "$run: done"
    done
done
"$python" - "$out" <<'EOF'
import csv, json, sys
out = sys.argv[1]
rows = {}
for stage in (2, 3):
    for mode in ("none", "cpu"):
        run = f"{out}/zero{stage}_{mode}"
        log = list(csv.DictReader(open(f"{run}/metrics.csv")))
        a, b = log[0], log[-1]  # tokens/s between the first logged step and the last (compiling steps excluded)
        tps = (int(b["tokens"]) - int(a["tokens"])) / (float(b["seconds"]) - float(a["seconds"]))
        rows[(stage, mode)] = {"tokens_per_s": tps, "eval_loss": json.load(open(f"{run}/result.json"))["final"]["eval_loss"]}
summary = {f"zero{s}": {"tokens_per_s_none": rows[(s, "none")]["tokens_per_s"], "tokens_per_s_cpu": rows[(s, "cpu")]["tokens_per_s"],
                        "offload_over_none_time": rows[(s, "none")]["tokens_per_s"] / rows[(s, "cpu")]["tokens_per_s"],
                        "eval_loss_none": rows[(s, "none")]["eval_loss"], "eval_loss_cpu": rows[(s, "cpu")]["eval_loss"]}
           for s in (2, 3)}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
