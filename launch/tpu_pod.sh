#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: run the same command on every host (JAX finds the
# coordinator itself on TPU VMs).  Usage (from your workstation):
#   TPU=my-v4-64 ZONE=us-central2-b WORKDIR=gs://bucket/runs/cifar10_ctm \
#   CONFIG=configs/cifar10_ctm.py bash launch/tpu_pod.sh --config.teacher.path=... ...
# --dry_run (first argument): print the gcloud command and the command every host would run,
# run nothing.
set -euo pipefail
DRY_RUN=0
if [ "${1:-}" = "--dry_run" ]; then DRY_RUN=1; shift; fi
: "${TPU:?name of the TPU VM}" "${ZONE:?its zone}" "${WORKDIR:?gs:// or shared path}" "${CONFIG:?config file}"
DATA_DIR=${DATA_DIR:-gs://your-bucket/tensorflow_datasets}
TRAIN=(python -m launch.train --config="$CONFIG" --workdir="$WORKDIR"
       --config.distributed.initialize=True --config.data.data_dir="$DATA_DIR" "$@")
REMOTE="cd ~/ctm-jax && . .venv/bin/activate && $(printf '%q ' "${TRAIN[@]}")"
SSH=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$REMOTE")
if [ "$DRY_RUN" = 1 ]; then
  echo "# on this workstation:"
  printf '%q ' "${SSH[@]}"; echo
  echo "# on every host of $TPU (--worker=all):"
  echo "$REMOTE"
  exit 0
fi
exec "${SSH[@]}"
