#!/bin/bash
# TPU VM pod slice (e.g. v4-32 or v5p-64): the same command on every worker; jax.distributed.initialize() finds the
# workers itself (TPU_WORKER_HOSTNAMES). The workdir must be on storage every worker sees (a GCS bucket through
# gcsfuse, or Filestore).
#   bash launch/tpu_vm_pod.sh my-tpu us-central2-b configs/resnext50.py /mnt/shared/runs/rx50 [--config.field=value ...]
# A preempted (spot) slice gets SIGTERM on every worker: all save the same step and exit 0; recreate the slice and
# run the same command to resume. If one worker dies, the others exit within config.peer_timeout_s with one line.
set -euo pipefail
TPU=${1:?usage: tpu_vm_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]}
ZONE=${2:?usage: tpu_vm_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]}
CONFIG=${3:?usage: tpu_vm_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]}
WORKDIR=${4:?usage: tpu_vm_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]}
shift 4
EXTRA=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  cd \$HOME/resnext-jax
  python -m train --config $(printf %q "$CONFIG") --workdir $(printf %q "$WORKDIR")$EXTRA
"
