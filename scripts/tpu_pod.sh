#!/usr/bin/env bash
# The pipeline on a TPU VM pod slice: the same command on every host (one process per host), started
# through gcloud; jax.distributed.initialize() finds the slice's hosts by itself.
#
#   NAME=my-v4-32 ZONE=us-central2-b WORKDIR=gs://my-bucket/runs/c3l scripts/tpu_pod.sh \
#     --config=configs/llava15.py:7b --config.model.checkpoint=gs://my-bucket/checkpoints/llava15-7b ...
#
# Needs the repository checked out as ~/c3l-jax on every host with its Python environment installed
# (e.g. once: gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=all --command="git clone ... c3l-jax
# && pip install -e c3l-jax 'jax[tpu]'"). WORKDIR must be shared by all hosts: a gs:// bucket.
# With a gs:// workdir each host keeps its log locally: ~/c3l-jax/logs/run.log (process 0) and
# ~/c3l-jax/logs/run.process-N.log (docs/multihost.md).
set -euo pipefail
: "${NAME:?set NAME to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://...)}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="cd c3l-jax && \
  python launch.py --workdir=$WORKDIR --config.distributed=True$args"
