#!/usr/bin/env bash
# The deepspeed launcher: single node (NUM_GPUS ranks) or multi-node with a hostfile
# ("host slots=N" lines; passwordless ssh between nodes, as DeepSpeed's pdsh/ssh runner needs).
#   single node:  NUM_GPUS=2 bash launch/deepspeed.sh [train args]
#   multi-node:   HOSTFILE=hostfile MASTER_ADDR=<first host> bash launch/deepspeed.sh [train args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_cmd deepspeed "install the package: bash scripts/setup_env.sh"
args=("$@"); (( ${#args[@]} )) || args=("${default_train_args[@]}")
if [[ -n "${HOSTFILE:-}" ]]; then
    need_file "$HOSTFILE" "HOSTFILE must list 'hostname slots=N' lines"
    need_var MASTER_ADDR "multi-node runs need the first host's address"
    exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
        --module ds_structopt.train "${args[@]}"
fi
exec deepspeed --num_gpus "${NUM_GPUS:-2}" --master_port "${MASTER_PORT:-29500}" --module ds_structopt.train "${args[@]}"
