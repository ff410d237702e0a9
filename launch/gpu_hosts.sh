#!/usr/bin/env bash
# Train on N GPU hosts (one process per host, all local GPUs each).  Run on every host with
# its own PROCESS_ID (0..N-1); COORDINATOR is host 0's address:port, reachable from all hosts.
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=4 PROCESS_ID=0 WORKDIR=/path/to/nfs/in64_ctm \
#   CONFIG=configs/imagenet64_ctm.py bash launch/gpu_hosts.sh --config.teacher.path=...
# On SLURM, leave COORDINATOR/NUM_PROCESSES/PROCESS_ID unset: JAX reads them from SLURM.
# --dry_run (first argument): print the command of every host (of this host only on SLURM),
# run nothing.
set -euo pipefail
DRY_RUN=0
if [ "${1:-}" = "--dry_run" ]; then DRY_RUN=1; shift; fi
: "${WORKDIR:?shared workdir}" "${CONFIG:?config file}"
command_for() {   # the command of process $1 ('' = SLURM / auto-detected)
  local args=(--config="$CONFIG" --workdir="$WORKDIR" --config.distributed.initialize=True)
  if [ -n "$1" ]; then
    args+=(--config.distributed.coordinator_address="$COORDINATOR"
           --config.distributed.num_processes="$NUM_PROCESSES"
           --config.distributed.process_id="$1")
  fi
  CMD=(python -m launch.train "${args[@]}" "${EXTRA[@]}")
}
EXTRA=("$@")
if [ -n "${COORDINATOR:-}" ]; then
  : "${NUM_PROCESSES:?number of hosts}" "${PROCESS_ID:?index of this host, 0..NUM_PROCESSES-1}"
  if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ && "$PROCESS_ID" =~ ^[0-9]+$ ]] ||
     [ "$PROCESS_ID" -ge "$NUM_PROCESSES" ]; then
    echo "gpu_hosts.sh: PROCESS_ID=$PROCESS_ID must be in 0..NUM_PROCESSES-1 (NUM_PROCESSES=$NUM_PROCESSES >= 1)" >&2
    exit 2
  fi
fi
if [ "$DRY_RUN" = 1 ]; then
  if [ -n "${COORDINATOR:-}" ]; then
    for ((p = 0; p < NUM_PROCESSES; p++)); do
      command_for "$p"
      echo "# host $p of $NUM_PROCESSES$([ "$p" = "$PROCESS_ID" ] && echo ' (this host)'):"
      printf '%q ' "${CMD[@]}"; echo
    done
  else
    command_for ""
    echo "# every host (coordinator, process count and index from SLURM / JAX):"
    printf '%q ' "${CMD[@]}"; echo
  fi
  exit 0
fi
command_for "${COORDINATOR:+$PROCESS_ID}"
exec "${CMD[@]}"
