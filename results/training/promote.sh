#!/usr/bin/env bash
# Promote a finished single-split run (seed 42, the released split) to the released model of its dataset when
# its RECIPE wins on validation: more validation images right, pooled over the recipe's 5-fold CV, than the
# released model's recipe (training/release_rule.py; a tie keeps the released one; the test split and the CV's
# test folds take no part in the choice) -- then re-export the model repository, which refits the trust outputs
# (temperature, OOD, conformal) on it. Until 2026-12-07 the rule compared the two cells' own validation macro-F1
# (33 HuSHem / 449 SMIDS images), which swapped releases on one image.
# Usage: results/training/promote.sh RUN_DIR DATASET [CANDIDATE_CV_DIR]
#   e.g. results/training/promote.sh results/benchmarks/accuracy/smids/freeze_unfreeze/single smids
set -euo pipefail
cd "$(dirname "$0")/../.."
run=$1; ds=$2; released=results/training/$ds
.venv/bin/python -m morphocam.training.release_rule --candidate "$run" --released "$released" \
  ${3:+--candidate-cv "$3"}
for f in model.safetensors model.safetensors.sha256 metrics.json config.yaml split.json curves.png roc.png \
         confusion.png test_predictions.npz; do
  [ -e "$run/$f" ] && cp "$run/$f" "$released/$f"
done
.venv/bin/morphocam-export --checkpoints results/training/hushem/model.safetensors,results/training/smids/model.safetensors \
  --output model_repository
