#!/usr/bin/env bash
# torchrun, single node or multi-node rendezvous (c10d).
#   single node:  NPROC_PER_NODE=2 bash launch/torchrun.sh [train args]
#   multi-node:   on every node: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node0 host> MASTER_PORT=29500 \
#                 NPROC_PER_NODE=<gpus per node> bash launch/torchrun.sh [train args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_cmd torchrun "install the package: bash scripts/setup_env.sh, then use .venv/bin or activate it"
nnodes="${NNODES:-1}"
if (( nnodes > 1 )); then
    need_var MASTER_ADDR "multi-node torchrun needs the rendezvous host"
    need_var NODE_RANK "multi-node torchrun needs this node's rank"
fi
args=("$@"); (( ${#args[@]} )) || args=("${default_train_args[@]}")
exec torchrun --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC_PER_NODE:-2}" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-ds_structopt}" -m ds_structopt.train "${args[@]}"
