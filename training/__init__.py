"""Training stage: datasets and splits, the EfficientNet + CBAM model, the paper's recipe, metrics.

It reads images and writes a self-describing checkpoint (safetensors + metadata); nothing
downstream imports the training loop, only `morphocam.training.model` to rebuild the network.
"""
