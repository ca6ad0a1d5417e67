#!/usr/bin/env bash
# Keep what the device tool sends under its 64 MiB limit (issue 11: training on a lent GPU machine).
#
# The tool copies the tracked files plus the untracked, non-ignored ones, and this repository tracks
# ~130 MiB (released ONNX graphs and checkpoints), while the SMIDS + Lite0 bundle alone is ~62 MiB.
# Training there needs only the code and the accuracy results that finished cells are reused from.
# `slim` removes every other tracked file from git's index only (the files stay on disk) and ignores
# them in .git/info/exclude, so the tool leaves them behind; `restore` puts the index and the exclude
# file back. While slim, a pre-commit hook refuses every commit, so a slimmed index is never committed.
#   results/benchmarks/device_tree.sh slim      # before the device calls (prints what would travel)
#   results/benchmarks/device_tree.sh restore   # right after them
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
MARK=.git/morphocam-device-slim
HOOK=.git/hooks/pre-commit
# What travels: the packages' code, what `pip install -e .` reads, the run scripts, and of the accuracy
# results only what reusing a finished cell and writing the summary read (no plots, no checkpoints).
KEEP='^(morphocam|training|benchmarks|export|serving|clients)/|^(pyproject\.toml|README\.md)$|^results/benchmarks/[^/]+\.sh$|^results/benchmarks/accuracy[^/]*/.*/(metrics\.json|config\.yaml|split\.json|test_predictions\.npz)$'
case "${1:-}" in
  slim)
    [ -e "$MARK" ] && { echo "already slim (restore first)" >&2; exit 1; }
    git diff --cached --quiet || { echo "the index has staged changes: commit or unstage them first" >&2; exit 1; }
    mkdir -p "$(dirname "$HOOK")"  # a fresh clone's .git may have no hooks folder
    touch "$MARK"                  # first, so that restore can undo a slim that stops half-way
    [ -e "$HOOK" ] && mv "$HOOK" "$HOOK.before-slim"
    printf '#!/bin/sh\necho "device_tree.sh slim is active: run results/benchmarks/device_tree.sh restore first" >&2\nexit 1\n' > "$HOOK"
    chmod +x "$HOOK"
    drop=$(git ls-files | grep -Ev "$KEEP" || true)
    echo "# morphocam device_tree.sh slim" >> .git/info/exclude
    printf '%s\n' "$drop" | sed 's|^|/|' >> .git/info/exclude
    printf '%s\n' "$drop" | git rm -q --cached --pathspec-from-file=-
    echo "slim: $(printf '%s\n' "$drop" | wc -l) tracked files left behind"
    "${PY:-.venv/bin/python}" -m morphocam.training.bundle_cli tree --carry device_bundle --top 5 || true;;
  restore)
    [ -e "$MARK" ] || { echo "not slim"; exit 0; }
    git reset -q
    sed -i '/^# morphocam device_tree.sh slim$/,$d' .git/info/exclude
    rm -f "$HOOK" "$MARK"
    if [ -e "$HOOK.before-slim" ]; then mv "$HOOK.before-slim" "$HOOK"; fi
    git diff --cached --quiet && echo "restored: the index equals HEAD";;
  *) echo "usage: $0 slim|restore" >&2; exit 2;;
esac
