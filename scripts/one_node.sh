#!/usr/bin/env bash
# The pipeline on one machine with several GPUs (or TPU chips): one process sees every local device;
# config.inference.mesh / config.train.mesh lay the model over them (default: data parallel).
#
#   scripts/one_node.sh --config=configs/llava15.py:7b --workdir=runs/coco7b \
#     --config.model.checkpoint=checkpoints/llava15-7b --config.data.coco_dir=/data/coco2014
set -euo pipefail
cd "$(dirname "$0")/.."
exec python launch.py "$@"
