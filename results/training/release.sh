#!/usr/bin/env bash
# Trains the two released checkpoints (commands and measured results: README, "Training").
set -euo pipefail
DATA=${MORPHOCAM_DATA:-../shared/datasets}
COMMON="--arch tf_efficientnet_lite0 --pretrained lite0 --cbam true --freeze-unfreeze true --seed 42 --progress false"
morphocam-train $COMMON --data-dir "$DATA/hushem" --output-dir results/training/hushem \
  --frozen-epochs 5 --epochs 25 --lr-head 1e-3 --lr 2e-4 --mixup-alpha 0.4 --label-smoothing 0.1
morphocam-train $COMMON --data-dir "$DATA/smids" --output-dir results/training/smids \
  --frozen-epochs 2 --epochs 4 --lr-head 1e-3 --lr 2e-4
