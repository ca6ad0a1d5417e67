#!/usr/bin/env bash
# The full-budget accuracy benchmark (issue 11): the paper's 224 px and 100 epochs (10 head-only + 90),
# MixUp 0.4 + label smoothing 0.1, EMA of weights, offline ImageNet Lite0 weights.
# Resumable: run it again and every finished cell is reused, a stopped one continues from its last epoch.
# Niced so that interactive work on the same 2 cores comes first.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec nice -n 19 .venv/bin/morphocam-bench accuracy --datasets hushem --configs full --folds 5 \
  --cv-datasets hushem --input-size 224 --frozen-epochs 10 --epochs 90 --lr-head 3e-3 --lr 3e-4 \
  --ema-decay 0.99 --threads 2 --device cpu --output-dir results/benchmarks/accuracy "$@"
