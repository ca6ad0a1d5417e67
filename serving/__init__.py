"""Serving stage: the real NVIDIA Triton Inference Server on this machine, and its Python-backend models.

- :mod:`serving.launcher` finds the ``tritonserver`` binary bundled in the ``nvidia-pytriton`` wheel,
  assembles the Python backend, starts/stops the server (:class:`serving.launcher.TritonServer`).
- :mod:`serving.cli` is ``morphocam-serve``.
- ``serving/triton_models/classifier.py`` and ``explainer.py`` are the ``model.py`` files the export
  stage copies into the model repository.
- :mod:`serving.faithfulness` checks that Grad-CAM++ heatmaps mean something.
"""

from .launcher import PortInUseError, ServerStartError, TritonServer, free_port  # noqa: F401
