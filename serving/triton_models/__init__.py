"""The code that runs inside Triton: the sources the exporter copies into each model's version folder.

``export/repository.py`` (``MODEL_FILES``) says which file lands where:

- classifier ``<model>/1/``: ``model.py`` <- ``classifier.py`` (ONNX Runtime / OpenVINO in the Python backend);
- explainer ``<model>_explain/1/``: ``model.py`` <- ``explainer.py``, plus ``explain_core.py`` (Grad-CAM++,
  PNG overlay) and ``morphocam_net.py`` (the network, CBAM, the checkpoint reader).

Every file here must run where the morphocam project is not installed (a stock NGC Triton container
with the pip packages the README lists): none of them imports ``morphocam``. Triton's Python-backend
stub puts the version folder on ``sys.path``, so siblings import each other as top-level modules.
The project imports ``morphocam_net`` and ``explain_core`` from this package (training builds its
network from ``morphocam_net``), so each has exactly one source; tests check that the committed
``model_repository`` copies equal these files.
"""
