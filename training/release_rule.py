"""The release rule: may a release-split cell replace the released model of its dataset?

A *recipe* (start weights, ablation row, results root) is a folder of the accuracy benchmark holding
its release-split cell ``single/`` and its cross-validation cells ``fold0`` … ``fold{k-1}``. A cell is
promoted only when its recipe has more validation images right than the released model's recipe,
pooled over the CV's folds (~130 HuSHem / ~1,800 SMIDS images instead of the release split's 33 /
449, where one image decided earlier promotions). Both CVs must use the same folds, and a tie keeps
the released model. Only validation counts: neither the release split's test part nor the CV's test
folds (which hold the release split's test images) take part in the choice.

The released model's recipe is found through its checkpoint hash: the ``single/metrics.json`` under
``--search`` whose ``checkpoint_sha256`` equals the released ``metrics.json``'s.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from morphocam.config import parse_config

from .config import ReleaseRuleConfig


class ReleaseRuleError(ValueError):
    """The two recipes cannot be compared (unreadable cells, other folds, no released cell found)."""


@dataclass(frozen=True)
class CVValidation:
    """One recipe's CV validation, pooled over its folds."""

    recipe: Path
    correct: int
    n: int
    val_ids: tuple[tuple[str, ...], ...]  # each fold's validation images, to check two CVs share folds

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate: CVValidation | None
    released: CVValidation | None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReleaseRuleError(f"{path}: {exc}") from exc


def cv_validation(recipe: Path) -> CVValidation | None:
    """The recipe's pooled CV validation; None when its CV has not run or not every fold has finished."""
    first = recipe / "fold0" / "split.json"
    if not first.exists():
        return None
    folds = int(_read(first)["folds"])
    correct = n = 0
    val_ids = []
    for k in range(folds):
        cell = recipe / f"fold{k}"
        if not (cell / "metrics.json").exists():
            return None  # a fold still training: the CV is not a result yet
        val = _read(cell / "metrics.json")["val"]
        cm = val["confusion_matrix"]
        # images right = the confusion matrix's diagonal (exact, unlike accuracy x n)
        correct += sum(cm[i][i] for i in range(len(cm)))
        n += sum(map(sum, cm))
        val_ids.append(tuple(_read(cell / "split.json")["val"]))
    return CVValidation(recipe, correct, n, tuple(val_ids))


def released_recipe(released: Path, search: Path) -> Path:
    """The recipe folder whose release-split cell is the released model (matched by checkpoint hash)."""
    sha = _read(released / "metrics.json").get("checkpoint_sha256")
    if not sha:
        raise ReleaseRuleError(f"{released}/metrics.json records no checkpoint_sha256")
    for metrics in sorted(search.glob("*/*/*/single/metrics.json")):
        if _read(metrics).get("checkpoint_sha256") == sha:
            return metrics.parent.parent
    raise ReleaseRuleError(f"no release-split cell under {search} holds the released checkpoint {sha[:12]}…")


def decide(candidate: Path, released: Path, search: Path, candidate_cv: Path | None = None) -> Decision:
    """Apply the rule; raises :class:`ReleaseRuleError` when the recipes cannot be compared.

    ``candidate_cv`` is the candidate recipe's CV folder when it is not ``candidate``'s parent.
    """
    cand_metrics, rel_metrics = _read(candidate / "metrics.json"), _read(released / "metrics.json")
    if cand_metrics.get("fold") is not None or cand_metrics["split"] != rel_metrics["split"]:
        raise ReleaseRuleError(f"{candidate} is not the released split: {cand_metrics['split']} fold "
                               f"{cand_metrics.get('fold')} vs {rel_metrics['split']}")
    old_recipe, new_recipe = released_recipe(released, search), candidate_cv or candidate.parent
    old = cv_validation(old_recipe)
    if old is None:
        raise ReleaseRuleError(f"the released recipe {old_recipe} has no finished cross-validation")
    if new_recipe.resolve() == old_recipe.resolve():
        return Decision(False, f"{new_recipe} is the released recipe: a re-training of it is no new evidence",
                        old, old)
    new = cv_validation(new_recipe)
    if new is None:
        return Decision(False, f"{new_recipe} has no finished cross-validation: run its folds first", None, old)
    if new.val_ids != old.val_ids:
        raise ReleaseRuleError(f"{new_recipe} and {old_recipe} were cross-validated on different folds")
    verdict = new.correct > old.correct
    reason = (f"pooled CV validation: candidate recipe {new.correct}/{new.n} ({new.accuracy:.1%}) vs released "
              f"{old.correct}/{old.n} ({old.accuracy:.1%}): " + ("promoted" if verdict else "not promoted"))
    return Decision(verdict, reason, new, old)


def main(argv: list[str] | None = None) -> int:
    """Exit 0: promote; 1: keep the released model; 2: the recipes cannot be compared."""
    cfg = parse_config(ReleaseRuleConfig, argv, "Decide whether a release-split cell replaces the released "
                       "model (pooled CV validation of the two recipes).",
                       prog="python -m morphocam.training.release_rule")
    try:
        decision = decide(cfg.candidate, cfg.released, cfg.search, cfg.candidate_cv)
    except ReleaseRuleError as exc:
        print(f"release rule: error: {exc}", file=sys.stderr)
        return 2
    print(decision.reason)
    return 0 if decision.promote else 1


if __name__ == "__main__":
    sys.exit(main())
