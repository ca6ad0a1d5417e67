"""Grad-CAM++ in the project: the served explainer's own code, with the project's input contract.

The computation lives in the standalone ``serving/triton_models/explain_core.py`` (copied into every
explain model folder); this module adds what only the project has, :class:`morphocam.contract.InputContract`,
for :mod:`morphocam.serving.faithfulness`, the benchmarks and the tests.
"""

from __future__ import annotations

from morphocam.contract import InputContract

from .triton_models import explain_core
from .triton_models.explain_core import overlay_png, target_layer  # noqa: F401 - public names of this module


class Explainer(explain_core.Explainer):
    """:class:`explain_core.Explainer` plus :attr:`contract`."""

    @property
    def contract(self) -> InputContract:
        return InputContract.from_dict(self.meta["contract"])
