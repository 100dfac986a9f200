#!/usr/bin/env bash
# System packages some tests use for real, from Debian: OpenMPI (mpirun launcher test),
# SLURM + munge (two-node sbatch tests; tests/slurm_cluster.py starts the daemons itself) and
# libaio-dev (DeepSpeed's async I/O op for NVMe offload; scripts/test.sh builds the op).
# Best effort: needs root and apt-get; where a tool is missing the tests that need it skip
# with a clear reason.
set -uo pipefail
want=()
command -v mpirun >/dev/null 2>&1 || want+=(openmpi-bin)
[[ -e /usr/include/libaio.h ]] || want+=(libaio-dev)
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    tool="${pair%%:*}"; pkg="${pair#*:}"
    command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || want+=("$pkg")
done
(( ${#want[@]} )) || exit 0
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps: not root or no apt-get; tests needing ${want[*]} will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null 2>&1 \
    || echo "install_system_deps: apt-get install ${want[*]} failed; tests needing them will be skipped" >&2
exit 0
