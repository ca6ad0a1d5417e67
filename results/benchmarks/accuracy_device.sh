#!/usr/bin/env bash
# The accuracy benchmark on a lent GPU machine (issue 11), as one prepared command for the device tool.
#
# Here, first (see the README, "Accuracy on a GPU machine"):
#   morphocam-bundle pack                          # datasets as lossless WebP + offline ImageNet weights -> device_bundle/
#   results/benchmarks/device_tree.sh slim         # the tree that travels drops to ~1 MB + the bundle
# Then the device tool's run (each quoted argument is one group of `morphocam-bench accuracy` flags), e.g.
# SMIDS's six full-recipe cells, which alone fill one 600 s call (six at a time: ~5 s an epoch each on the H200):
#   command: BUDGET_S=520 REPRO=0 SUMMARY="--datasets smids --configs full --folds 5 --cv-datasets smids" \
#            results/benchmarks/accuracy_device.sh "--datasets smids --configs full --folds 5 --cv-datasets smids --workers 6"
#   carry:   ["device_bundle"]                     timeout_s: 600
# or groups in order of need, e.g. "... --workers 6" "after:1 --datasets smids --configs cbam --folds 0".
# And after it: results/benchmarks/device_tree.sh restore; unpack $OUT's archive over the repository.
#
# There: installs this checkout without dependencies (the machine's own torch/timm/numpy serve), restores
# the datasets with their original file names and pixels (the manifest's hashes are checked, so every
# seeded split equals this machine's), then starts the groups: each one benchmark with its own workers
# (training processes sharing its cells on the one GPU under per-cell locks). A group starts at once, or,
# written "after:N ...", when group N has ended, so the cells that matter most hold the GPU first. At
# BUDGET_S seconds every group still running is stopped (finished cells are kept; a stopped one restarts
# later). Then one summary pass over SUMMARY's cells, and $OUT receives: one archive of the results
# (metrics, splits, predictions, plots, worker logs; no weights), the full-recipe single-split and ensemble
# checkpoints trained by this call (release candidates; see below), the benchmark logs and the machine's facts.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-out/device}"
BUDGET_S="${BUDGET_S:-420}"
RESULTS="${RESULTS:-results/benchmarks/accuracy}"
WORK="${WORK:-/tmp/morphocam}"
PY="${PY:-python3}"          # the machine's Python, which holds its torch
DEVICE="${DEVICE:-cuda}"     # cpu: a dry run of this script on a CPU machine (with tiny flags)
# the summary pass covers every cell the groups can make (override for other plans)
SUMMARY="${SUMMARY:---datasets hushem,smids --configs simplecnn,efficientnet,cbam,freeze_unfreeze,full --folds 5 --cv-datasets hushem,smids --members 5 --member-datasets hushem}"
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
echo "[device] set-up took $((SECONDS - t0)) s; benchmark budget ${BUDGET_S} s, $# groups"

# the full budget of accuracy_run.sh; a group's flags come after, and win
BENCH=("$PY" -m morphocam.benchmarks.cli accuracy --device "$DEVICE" --threads 1 --input-size 224 --frozen-epochs 10
       --epochs 90 --lr-head 3e-3 --lr 3e-4 --ema-decay 0.99 --output-dir "$RESULTS")
mkdir -p "$WORK/logs"
declare -a PIDS WAITS FLAGS
i=0
for g in "$@"; do
  i=$((i + 1))
  if [[ "$g" == after:* ]]; then WAITS[$i]="${g%% *}"; WAITS[$i]="${WAITS[$i]#after:}"; g="${g#* }"; else WAITS[$i]=0; fi
  FLAGS[$i]="$g"
done
start_group() {  # $1 = group number
  # shellcheck disable=SC2086  # a group's flags are split into words on purpose
  setsid "${BENCH[@]}" ${FLAGS[$1]} >"$WORK/logs/group$1.log" 2>&1 &
  PIDS[$1]=$!
  echo "[device] +$((SECONDS - t0)) s: group $1 started: ${FLAGS[$1]}"
}
alive() { [ -n "${PIDS[$1]:-}" ] && kill -0 "${PIDS[$1]}" 2>/dev/null; }
if [ "${REPRO:-1}" = 1 ]; then
  # The reproduction check the issue asks for: a short HuSHem run in FP32 with the loader's augmentation, as
  # the CPU trains; the same command on the CPU here (--device cpu) gives the curves to compare.
  "$PY" -m morphocam.training.cli --dataset hushem --arch tf_efficientnet_lite0 --pretrained lite0 --input-size 224 \
    --frozen-epochs 2 --epochs 3 --lr-head 3e-3 --lr 3e-4 --mixup-alpha 0.4 --label-smoothing 0.1 --ema-decay 0 \
    --amp off --augment-on loader --threads 1 --progress false --device "$DEVICE" \
    --output-dir "$RESULTS/repro/$DEVICE" >"$WORK/logs/repro.log" 2>&1 &
fi
deadline=$((SECONDS + BUDGET_S))
while [ "$SECONDS" -lt "$deadline" ]; do
  pending=0
  for ((j = 1; j <= i; j++)); do
    if [ -z "${PIDS[$j]:-}" ]; then
      w=${WAITS[$j]}
      if [ "$w" = 0 ] || { [ -n "${PIDS[$w]:-}" ] && ! alive "$w"; }; then start_group "$j"; fi
      pending=1
    elif alive "$j"; then pending=1
    fi
  done
  [ "$pending" = 0 ] && break
  sleep 3
done
for ((j = 1; j <= i; j++)); do
  if alive "$j"; then
    echo "[device] budget of ${BUDGET_S} s reached: stopping group $j (finished cells are kept)"
    kill -TERM -- "-${PIDS[$j]}" 2>/dev/null
  fi
done
sleep 3
for ((j = 1; j <= i; j++)); do
  [ -n "${PIDS[$j]:-}" ] && { kill -KILL -- "-${PIDS[$j]}" 2>/dev/null; wait "${PIDS[$j]}" 2>/dev/null; }
done
echo "[device] +$((SECONDS - t0)) s: training over"
cat "$WORK"/logs/group*.log > "$OUT/bench.log" 2>/dev/null
# shellcheck disable=SC2086
"${BENCH[@]}" --train false $SUMMARY >>"$OUT/bench.log" 2>&1  # summary of what landed (trains nothing)
grep -E "acc |fold|ensemble|Error|error|Traceback" "$OUT/bench.log" | tail -60
cp -r "$WORK/logs" "$RESULTS/device_logs" 2>/dev/null
tar czf "$OUT/results.tgz" --exclude='model.safetensors*' --exclude=train_state.pt --exclude=.cell.lock "$RESULTS"
# Release candidates trained by this call: the SMIDS full-recipe checkpoint as it is (FP32); the HuSHem
# full-recipe single split and ensemble members rounded to FP16 (to be checked against their recorded test
# predictions before any use), two to an archive, within the tool's 8 files of <= 16 MiB, 64 MiB in all.
"$PY" - "$RESULTS" "$WORK/started" "$OUT" <<'PY'
import os, sys, tarfile
from pathlib import Path
from safetensors.torch import load_file, save_file
results, started, out = Path(sys.argv[1]), os.path.getmtime(sys.argv[2]), Path(sys.argv[3])
new = sorted(p for p in results.glob("*/*/*/model.safetensors") if p.stat().st_mtime > started)
exact = [p for p in new if p.parts[-4:-1] == ("smids", "full", "single")]
members = [p for p in new if p.parts[-3] == "full" and p not in exact
           and (p.parent.name == "single" or p.parent.name.startswith("member"))]
room = 64 * 2**20 - sum(f.stat().st_size for f in out.iterdir()) - 2**20
for p in exact:
    if p.stat().st_size < min(room, 16 * 2**20):
        name = "_".join(p.parts[-4:-1]) + ".safetensors"
        (out / name).write_bytes(p.read_bytes()); room -= p.stat().st_size; print("[device] ->", name)
for k in range(0, len(members), 2):
    tgz = out / f"members{k // 2}.tar"
    with tarfile.open(tgz, "w") as tf:
        for p in members[k:k + 2]:
            half = p.with_name("model_fp16.safetensors")
            from safetensors import safe_open
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
            tensors = {n: (t.half() if t.is_floating_point() else t) for n, t in load_file(str(p)).items()}
            save_file(tensors, str(half), metadata={**meta, "stored_as": "fp16 copy for transfer"})
            tf.add(half, arcname="/".join(p.parts[-4:-1]) + "/model_fp16.safetensors")
    if tgz.stat().st_size > min(room, 16 * 2**20):
        tgz.unlink(); print("[device] no room for", tgz.name); break
    room -= tgz.stat().st_size; print("[device] ->", tgz.name)
PY
ls -la "$OUT"
echo "[device] total $((SECONDS - t0)) s"
