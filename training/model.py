"""Networks: a timm backbone with CBAM on its final feature map, and the SimpleCNN baseline.

The definition lives in ``serving/triton_models/morphocam_net.py`` (imported here as
:mod:`morphocam.serving.triton_models.morphocam_net`): that file is copied into every explain model
folder, where the project is not installed, so it is the single source and training uses it as is.
"""

from __future__ import annotations

from morphocam.serving.triton_models.morphocam_net import (  # noqa: F401 - this module's public names
    CBAM, SIMPLECNN, ChannelAttention, MorphoNet, SimpleCNN, SpatialAttention, build_model)
