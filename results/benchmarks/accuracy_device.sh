#!/usr/bin/env bash
# The accuracy benchmark on a lent GPU machine (issue 11), as one prepared command for the device tool.
#
# Here, first (see the README, "Accuracy on a GPU machine"):
#   morphocam-bundle pack                          # datasets as lossless WebP + offline ImageNet weights -> device_bundle/
#   results/benchmarks/device_tree.sh slim         # the tree that travels drops to ~7 MB
# Then the device tool's run, e.g. (flags after the script go to `morphocam-bench accuracy`):
#   command: BUDGET_S=420 results/benchmarks/accuracy_device.sh --datasets hushem,smids --configs full --folds 5 --cv-datasets hushem,smids
#   carry:   ["device_bundle"]                     timeout_s: 540
# And after it: results/benchmarks/device_tree.sh restore; unpack $OUT's archives over results/benchmarks/.
#
# There: installs this checkout without dependencies (the machine's own torch/timm/numpy serve), restores
# the datasets with their original file names and pixels (the manifest's hashes are checked, so every
# seeded split equals this machine's), runs the benchmark with WORKERS training processes sharing the
# cells on the one GPU (each run alone leaves it mostly idle), stops it at BUDGET_S seconds (finished
# cells are kept; a stopped one restarts later), then summarises what landed and packs it into $OUT:
# one archive per output folder (metrics, splits, predictions, plots, worker logs; no weights), the
# full-recipe single-split checkpoints (release candidates), the benchmark log and the machine's facts.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-out/device}"
BUDGET_S="${BUDGET_S:-420}"
WORKERS="${WORKERS:-8}"
RESULTS="${RESULTS:-results/benchmarks/accuracy}"
WORK="${WORK:-/tmp/morphocam}"
PY="${PY:-python3}"          # the machine's Python, which holds its torch
DEVICE="${DEVICE:-cuda}"     # cpu: a dry run of this script on a CPU machine (with tiny flags)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
touch "$WORK/started"  # checkpoints newer than this were trained by this call
t0=$SECONDS
if [ "${LINK_INSTALL:-0}" = 1 ] || ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    >"$WORK/install.log" 2>&1; then
  # No pip install possible: lay out the namespace that pyproject's package-dir mapping gives (morphocam/ with
  # the stage folders inside it) as links, and put it on the path.
  echo "[device] pip install -e failed or skipped ($(tail -1 "$WORK/install.log" 2>/dev/null)); linking the packages instead"
  pkg="$WORK/pkg/morphocam"; rm -rf "$WORK/pkg"; mkdir -p "$pkg"
  for f in "$PWD"/morphocam/*; do ln -s "$f" "$pkg/"; done
  for d in training export serving clients benchmarks; do ln -s "$PWD/$d" "$pkg/$d"; done
  # PYTHONSAFEPATH: the repository root (the working directory) must not shadow the linked namespace
  export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
fi
"$PY" -c "import morphocam.training.trainer, morphocam.benchmarks.accuracy" || { echo "morphocam does not import"; exit 1; }
"$PY" -m morphocam.training.bundle_cli unpack --bundle device_bundle --data-root "$WORK/datasets" \
  --weights-dir "$WORK/weights" || exit 1
export MORPHOCAM_DATA="$WORK/datasets" MORPHOCAM_WEIGHTS_DIR="$WORK/weights"
{ nvidia-smi -L 2>/dev/null; "$PY" -c "import torch, timm, numpy; print('torch', torch.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"; nproc; } \
  | tee "$OUT/machine.txt"
echo "[device] set-up took $((SECONDS - t0)) s; benchmark budget ${BUDGET_S} s, ${WORKERS} workers"

# the full budget of accuracy_run.sh; flags given to this script come after, and win
BENCH=("$PY" -m morphocam.benchmarks.cli accuracy --device "$DEVICE" --threads 2 --input-size 224 --frozen-epochs 10
       --epochs 90 --lr-head 3e-3 --lr 3e-4 --ema-decay 0.99 --output-dir "$RESULTS")
setsid "${BENCH[@]}" --workers "$WORKERS" "$@" >"$OUT/bench.log" 2>&1 &
pid=$!
deadline=$((SECONDS + BUDGET_S))
while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 5; done
if kill -0 "$pid" 2>/dev/null; then
  echo "[device] budget of ${BUDGET_S} s reached: stopping the workers (finished cells are kept)"
  kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null
fi
wait "$pid" 2>/dev/null
"${BENCH[@]}" --train false "$@" >>"$OUT/bench.log" 2>&1  # summary of what landed (trains nothing)
grep -E "acc |fold|ensemble|Error|error" "$OUT/bench.log" | tail -40
for ds in hushem smids; do
  [ -d "$RESULTS/$ds" ] || continue
  tar czf "$OUT/$(basename "$RESULTS")_$ds.tgz" --exclude='model.safetensors*' --exclude=train_state.pt \
    --exclude=.cell.lock "$RESULTS/$ds"
  ckpt="$RESULTS/$ds/full/single/model.safetensors"
  [ -f "$ckpt" ] && [ "$ckpt" -nt "$WORK/started" ] && cp "$ckpt" "$OUT/${ds}_full_single.safetensors"
done
tar czf "$OUT/$(basename "$RESULTS")_summary.tgz" "$RESULTS"/accuracy.json "$RESULTS"/accuracy.png "$RESULTS"/logs 2>/dev/null
ls -la "$OUT"
echo "[device] total $((SECONDS - t0)) s"
