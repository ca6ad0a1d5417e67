"""Serving stage: the real NVIDIA Triton Inference Server on this machine, and its Python-backend models.

- :mod:`morphocam.serving.launcher` finds the ``tritonserver`` binary bundled in the ``nvidia-pytriton`` wheel,
  assembles the Python backend, starts/stops the server (:class:`morphocam.serving.launcher.TritonServer`).
- :mod:`morphocam.serving.cli` is ``morphocam-serve``.
- ``serving/triton_models/classifier.py`` and ``explainer.py`` are the ``model.py`` files the export
  stage copies into the model repository.
- :mod:`morphocam.serving.faithfulness` checks that Grad-CAM++ heatmaps mean something.
"""

from .launcher import PortInUseError, ServerStartError, TritonServer, free_port  # noqa: F401
