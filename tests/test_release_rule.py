"""The release rule (training/release_rule.py, called by results/training/promote.sh): a cell replaces the
released model only when its recipe has more validation images right, pooled over the same CV folds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from morphocam.training.release_rule import ReleaseRuleError, cv_validation, decide, released_recipe

SPLIT = {"train": 10, "val": 4, "test": 4}


def _cell(folder: Path, *, fold: int | None, right: int, n: int = 4, sha: str | None = None,
          val_ids: list[str] | None = None, folds: int = 3) -> None:
    """One finished cell: metrics.json whose validation confusion matrix has ``right`` of ``n`` on the diagonal."""
    folder.mkdir(parents=True)
    wrong = n - right
    metrics = {"split": SPLIT, "fold": fold, "checkpoint_sha256": sha,
               "val": {"confusion_matrix": [[right, wrong], [0, 0]]}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if fold is not None:
        ids = val_ids or [f"f{fold}_img{i}.png" for i in range(n)]
        (folder / "split.json").write_text(json.dumps({"folds": folds, "fold": fold, "val": ids}))


def _recipe(root: Path, name: str, rights: list[int], sha: str) -> Path:
    recipe = root / "results" / "ds" / name
    _cell(recipe / "single", fold=None, right=4, sha=sha)
    for k, right in enumerate(rights):
        _cell(recipe / f"fold{k}", fold=k, right=right, folds=len(rights))
    return recipe


@pytest.fixture
def world(tmp_path):
    """A released model whose recipe 'old' has 8/12 validation images right over three folds."""
    old = _recipe(tmp_path, "old", [3, 2, 3], sha="aaa")
    released = tmp_path / "training" / "ds"
    _cell(released, fold=None, right=4, sha="aaa")
    return tmp_path, old, released


def test_pooled_validation_counts_the_diagonal_of_every_fold(world):
    _, old, _ = world
    score = cv_validation(old)
    assert (score.correct, score.n) == (8, 12)
    assert len(score.val_ids) == 3


def test_released_recipe_is_found_by_checkpoint_hash(world):
    root, old, released = world
    _recipe(root, "other", [4, 4, 4], sha="bbb")
    assert released_recipe(released, root).resolve() == old.resolve()
    (released / "metrics.json").write_text(json.dumps({"checkpoint_sha256": "ccc"}))
    with pytest.raises(ReleaseRuleError, match="no release-split cell"):
        released_recipe(released, root)


@pytest.mark.parametrize("rights, promoted", [([3, 3, 3], True), ([4, 2, 2], False), ([1, 1, 1], False)])
def test_candidate_needs_more_images_right_a_tie_keeps_the_release(world, rights, promoted):
    root, _, released = world
    new = _recipe(root, "new", rights, sha="bbb")
    decision = decide(new / "single", released, root)
    assert decision.promote is promoted
    assert decision.candidate.correct == sum(rights)


def test_candidate_without_a_finished_cv_is_not_promoted(world):
    root, _, released = world
    new = _recipe(root, "new", [4, 4, 4], sha="bbb")
    (new / "fold2" / "metrics.json").unlink()  # fold 2 still training
    decision = decide(new / "single", released, root)
    assert not decision.promote and "no finished cross-validation" in decision.reason


def test_retraining_the_released_recipe_is_no_new_evidence(world):
    root, old, released = world
    decision = decide(old / "single", released, root)
    assert not decision.promote and "released recipe" in decision.reason


def test_cvs_on_other_folds_cannot_be_compared(world):
    root, _, released = world
    new = _recipe(root, "new", [4, 4, 4], sha="bbb")
    (new / "fold1" / "split.json").write_text(json.dumps({"folds": 3, "fold": 1, "val": ["x", "y", "z", "w"]}))
    with pytest.raises(ReleaseRuleError, match="different folds"):
        decide(new / "single", released, root)


def test_a_fold_cell_is_not_a_release_candidate(world):
    root, old, released = world
    with pytest.raises(ReleaseRuleError, match="not the released split"):
        decide(old / "fold0", released, root)


def test_the_cv_may_live_under_another_results_root(world):
    root, _, released = world
    cv = _recipe(root / "elsewhere", "new", [4, 4, 4], sha="ddd")
    single = root / "results" / "ds" / "new_single_only" / "single"
    _cell(single, fold=None, right=4, sha="bbb")
    assert decide(single, released, root, candidate_cv=cv).promote


def test_committed_releases_stand_under_the_rule(repo_root):
    """On the repository's own results: the released recipes are found, and the cells that won on their own
    33 / 449 validation images (and were held back) are not promoted by the CV rule either."""
    search = repo_root / "results" / "benchmarks"
    for ds, recipe in (("smids", "accuracy/smids/full"), ("hushem", "accuracy_smids_init/hushem/full")):
        assert released_recipe(repo_root / "results" / "training" / ds, search) == search / recipe
    for ds, candidate in (("smids", "accuracy/smids/freeze_unfreeze/single"),
                          ("hushem", "accuracy_smids_fu_init/hushem/full/single"),
                          ("hushem", "accuracy/hushem/full/single")):
        decision = decide(search / candidate, repo_root / "results" / "training" / ds, search)
        assert not decision.promote, decision.reason


def test_cli_exit_codes(world):
    root, _, released = world
    new = _recipe(root, "new", [4, 4, 4], sha="bbb")
    run = lambda cand: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "morphocam.training.release_rule", "--candidate", str(cand),
         "--released", str(released), "--search", str(root)], capture_output=True, text=True)
    promoted = run(new / "single")
    assert promoted.returncode == 0 and "promoted" in promoted.stdout
    kept = run(root / "results" / "ds" / "old" / "single")
    assert kept.returncode == 1
    broken = run(root / "results" / "ds" / "old" / "fold0")
    assert broken.returncode == 2 and "error" in broken.stderr
