#!/usr/bin/env bash
# OpenMPI's mpirun; DeepSpeed discovers rank, world size and the master address through mpi4py.
#   one node:    NP=2 bash launch/mpirun.sh [train args]
#   multi-node:  NP=8 HOSTFILE=hostfile bash launch/mpirun.sh [train args]   ("host slots=N" lines)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_cmd mpirun "install OpenMPI (Debian/Ubuntu: apt-get install openmpi-bin)"
python="${PYTHON:-python}"
need_cmd "$python" "set PYTHON to the interpreter that has ds_structopt installed"
"$python" -c "import mpi4py.MPI" 2>/dev/null || die "mpi4py is not importable by $python (pip install mpi4py)"
mpi_args=(-np "${NP:-2}" --bind-to none -x PATH -x PYTHONPATH -x OMP_NUM_THREADS)
if [[ -n "${HOSTFILE:-}" ]]; then
    need_file "$HOSTFILE" "HOSTFILE must list 'hostname slots=N' lines"
    mpi_args+=(--hostfile "$HOSTFILE")
fi
[[ "$(id -u)" == 0 ]] && mpi_args+=(--allow-run-as-root)   # containers often run as root
args=("$@"); (( ${#args[@]} )) || args=("${default_train_args[@]}")
exec mpirun "${mpi_args[@]}" "$python" -m ds_structopt.train "${args[@]}"
