#!/usr/bin/env bash
# ZeRO-Offload step time against no offload: the entry point on 2 CPU ranks (deepspeed launcher,
# gloo, DeepSpeed's CPU accelerator), 60m LLaMA, AdaDiag++, ZeRO-2 and ZeRO-3, with and without
# "offload_optimizer": {"device": "cpu"}, and at ZeRO-3 with {"device": "nvme"} (files under
# OUT_DIR: on this disk, not a real NVMe drive); tokens/s after the first (compiling) steps, from
# each run's result.json, and the final eval loss of each. Resumable: a finished run is skipped.
# Usage: bash scripts/bench_offload.sh [OUT_DIR]   (about 15 min here)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/bench/offload}"
python=".venv/bin/python"
mkdir -p "$out"
for stage in 2 3; do
    modes="none cpu"; [[ $stage == 3 ]] && modes="none cpu nvme"
    for mode in $modes; do
        run="$out/zero${stage}_$mode"
        if [[ -f "$run/result.json" ]]; then echo "$run: cached"; continue; fi
        "$python" - "$stage" "$mode" "$out/zero${stage}_$mode.json" "$run.nvme" <<'EOF'
import json, sys
cfg = json.load(open("configs/ds_tiny_adadiagpp_zero2.json"))
cfg["zero_optimization"] = {"stage": int(sys.argv[1])}
if sys.argv[2] != "none":
    cfg["zero_optimization"]["offload_optimizer"] = {"device": sys.argv[2], "pin_memory": True}
if sys.argv[2] == "nvme":
    cfg["zero_optimization"]["offload_optimizer"]["nvme_path"] = sys.argv[4]
json.dump(cfg, open(sys.argv[3], "w"), indent=1)
EOF
        OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/deepspeed --num_gpus 2 --module ds_structopt.train --model 60m \
            --deepspeed_config "$out/zero${stage}_$mode.json" --steps 40 --eval-every 40 --save-every 1000 \
            --log-every 10 --output-dir "$run" > "$run.log" 2>&1 || { tail -20 "$run.log"; exit 1; }
        rm -rf "$run/checkpoints" "$run/tensorboard" "$run.nvme"  # hundreds of MB each; the figures are in metrics.csv/result.json
        echo "$run: done"
    done
done
"$python" - "$out" <<'EOF'
import csv, json, sys
out = sys.argv[1]
rows = {}
for stage, modes in ((2, ("none", "cpu")), (3, ("none", "cpu", "nvme"))):
    for mode in modes:
        run = f"{out}/zero{stage}_{mode}"
        log = list(csv.DictReader(open(f"{run}/metrics.csv")))
        a, b = log[0], log[-1]  # tokens/s between the first logged step and the last (compiling steps excluded)
        tps = (int(b["tokens"]) - int(a["tokens"])) / (float(b["seconds"]) - float(a["seconds"]))
        rows[(stage, mode)] = {"tokens_per_s": tps, "eval_loss": json.load(open(f"{run}/result.json"))["final"]["eval_loss"]}
summary = {f"zero{s}": {**{f"tokens_per_s_{m}": r["tokens_per_s"] for (t, m), r in rows.items() if t == s},
                        **{f"{m}_over_none_time": rows[(s, "none")]["tokens_per_s"] / r["tokens_per_s"]
                           for (t, m), r in rows.items() if t == s and m != "none"},
                        **{f"eval_loss_{m}": r["eval_loss"] for (t, m), r in rows.items() if t == s}}
           for s in (2, 3)}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
