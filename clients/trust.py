"""Which classified frames the report may count: the served trust outputs applied to a sample.

Every record of a model exported with trust outputs carries ``in_domain``, ``ood_score`` and
``prediction_set`` (class names, the split-conformal set). The report then counts three kinds of frame:

* **out-of-domain** (``in_domain`` false): unlike the frames the model was trained on (blank fields,
  debris, another stain or microscope, blur, bad exposure). Excluded from every count and from the
  % normal; listed with their score. When more than ``max_ood_share`` of the classified frames are
  out-of-domain the sample itself is unlike the training data: no % normal is given at all and
  the sample must be assessed by hand.
* **uncertain** (in-domain, set of more than one class): the model cannot narrow the frame down to one
  class at the stated coverage. Counted and listed for review; the % normal and the WHO flag use
  only the trusted frames, and the range the % would take if every uncertain cell were resolved
  either way is reported beside it.
* **trusted**: in-domain with a one-class set.

Records without these fields (a model exported without trust outputs, or an older results file)
count as trusted, and the report says the model gave no in-domain flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Above this share of out-of-domain frames a sample is not reported as a % normal. At the exported
# threshold about 5 % of in-domain frames are flagged (95 % acceptance), so a quarter of a sample
# flagged is far outside what an ordinary sample of the training distribution shows.
MAX_OOD_SHARE = 0.25


@dataclass
class TrustSplit:
    """The ok records of one sample, sorted by what the report may do with them."""

    trusted: list[dict] = field(default_factory=list)
    uncertain: list[dict] = field(default_factory=list)
    out_of_domain: list[dict] = field(default_factory=list)
    without_flag: int = 0  # records that carried no in_domain field

    @property
    def in_domain(self) -> list[dict]:
        return self.trusted + self.uncertain

    def ood_share(self) -> float:
        total = len(self.in_domain) + len(self.out_of_domain)
        return len(self.out_of_domain) / total if total else 0.0


def split_by_trust(ok_records: list[dict]) -> TrustSplit:
    split = TrustSplit()
    for r in ok_records:
        if "in_domain" not in r:
            split.without_flag += 1
        if r.get("in_domain", True) is False:
            split.out_of_domain.append(r)
        elif len(r.get("prediction_set") or [r.get("predicted_class")]) > 1:
            split.uncertain.append(r)
        else:
            split.trusted.append(r)
    return split


def ood_listing(records: list[dict]) -> list[dict]:
    return [{"frame_id": r["frame_id"], "ood_score": r.get("ood_score"), "predicted_class": r.get("predicted_class")}
            for r in sorted(records, key=lambda r: -(r.get("ood_score") or 0.0))]


def uncertain_listing(records: list[dict], explanations: dict[str, str] | None = None) -> list[dict]:
    rows = []
    for r in records:
        row = {"frame_id": r["frame_id"], "predicted_class": r.get("predicted_class"),
               "confidence": r.get("confidence"), "prediction_set": list(r.get("prediction_set") or [])}
        if explanations and r["frame_id"] in explanations:
            row["explanation"] = explanations[r["frame_id"]]
        rows.append(row)
    return rows
