"""Serving stage: the real NVIDIA Triton Inference Server on this machine, and its Python-backend models.

- :mod:`morphocam.serving.launcher`: :class:`~morphocam.serving.launcher.TritonServer`, the server's lifecycle
  (start, wait until every model is ready, stop, clean up). It composes:
  :mod:`.triton_install` (the ``nvidia-pytriton`` wheel's binary, Python backend and environment),
  :mod:`.ports` (free ports, the in-use check), :mod:`.processes` (the stub process tree, via psutil),
  :mod:`.shm` (the Python backend's ``/dev/shm`` segments), :mod:`.health` (liveness, readiness and
  the model index over HTTP) and :mod:`.errors`.
- :mod:`morphocam.serving.supervisor`: keeps a started server serving (reloads a model whose stub died or
  that is not ready, restarts a dead server on the same ports, Prometheus counters of both).
- :mod:`morphocam.serving.cli` is ``morphocam-serve``.
- ``serving/triton_models/``: the code that runs inside Triton, standalone (no ``morphocam`` imports);
  the exporter copies it into each model's version folder (classifier ``model.py``; explainer ``model.py``
  + ``explain_core.py`` + ``morphocam_net.py``).
- :mod:`morphocam.serving.explain` (Grad-CAM++ in-process) and :mod:`morphocam.serving.faithfulness`
  (checks that the heatmaps mean something).

Nothing is imported here, so that ``morphocam.serving.triton_models.morphocam_net`` (which training
imports) loads without the server machinery.
"""
