#!/usr/bin/env bash
# Train on N GPU hosts (one process per host, all local GPUs each).  Run on every host with
# its own PROCESS_ID (0..N-1); COORDINATOR is host 0's address:port, reachable from all hosts.
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=4 PROCESS_ID=0 WORKDIR=/path/to/nfs/in64_ctm \
#   CONFIG=configs/imagenet64_ctm.py bash launch/gpu_hosts.sh --config.teacher.npz_path=...
# On SLURM, leave COORDINATOR/NUM_PROCESSES/PROCESS_ID unset: JAX reads them from SLURM.
set -euo pipefail
: "${WORKDIR:?shared workdir}" "${CONFIG:?config file}"
ARGS=(--config="$CONFIG" --workdir="$WORKDIR" --config.distributed.initialize=True)
if [ -n "${COORDINATOR:-}" ]; then
  ARGS+=(--config.distributed.coordinator_address="$COORDINATOR"
         --config.distributed.num_processes="$NUM_PROCESSES"
         --config.distributed.process_id="$PROCESS_ID")
fi
exec python -m launch.train "${ARGS[@]}" "$@"
