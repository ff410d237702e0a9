#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: run the same command on every host (JAX finds the
# coordinator itself on TPU VMs).  Usage (from your workstation):
#   TPU=my-v4-64 ZONE=us-central2-b WORKDIR=gs://bucket/runs/cifar10_ctm \
#   CONFIG=configs/cifar10_ctm.py bash launch/tpu_pod.sh --config.teacher.path=... ...
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?its zone}" "${WORKDIR:?gs:// or shared path}" "${CONFIG:?config file}"
DATA_DIR=${DATA_DIR:-gs://your-bucket/tensorflow_datasets}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd ~/ctm-jax && . .venv/bin/activate &&
  python -m launch.train --config=$CONFIG --workdir=$WORKDIR \
    --config.distributed.initialize=True --config.data.data_dir=$DATA_DIR $*"
