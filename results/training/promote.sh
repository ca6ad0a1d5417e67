#!/usr/bin/env bash
# Promote a finished single-split run (seed 42, the released split) to the released model of its dataset
# when it wins on VALIDATION macro-F1 (a tie keeps the released one) -- the test split takes no part in the choice --
# then re-export the model repository, which refits the trust outputs (temperature, OOD, conformal) on it.
# Usage: results/training/promote.sh RUN_DIR DATASET   e.g. results/benchmarks/accuracy/hushem/full/single hushem
set -euo pipefail
cd "$(dirname "$0")/../.."
run=$1; ds=$2; released=results/training/$ds
.venv/bin/python - "$run" "$released" <<'PY'
import json, sys
new, old = (json.load(open(f"{d}/metrics.json")) for d in sys.argv[1:3])
key = lambda m: m["val"]["macro_f1"]
if new["split"] != old["split"] or new.get("fold") is not None:
    sys.exit(f"not the released split: {new['split']} fold {new.get('fold')} vs {old['split']}")
print(f"validation macro-F1: candidate {new['val']['macro_f1']:.4f} vs released {old['val']['macro_f1']:.4f}")
if key(new) <= key(old):
    sys.exit("candidate does not beat the released model on validation: not promoted")
PY
for f in model.safetensors model.safetensors.sha256 metrics.json config.yaml split.json curves.png roc.png \
         confusion.png test_predictions.npz; do
  [ -e "$run/$f" ] && cp "$run/$f" "$released/$f"
done
.venv/bin/morphocam-export --checkpoints results/training/hushem/model.safetensors,results/training/smids/model.safetensors \
  --output model_repository
