"""CASA client: stream frames to the served models, explain chosen frames, report per sample (no torch)."""
