"""Benchmarks: served vs in-process speed, accuracy against the paper, explanation cost.

Each benchmark is a sub-command of ``morphocam-bench`` that writes a JSON file and a PNG plot under
a results folder and prints a short table. Timings belong here, never in the test suite.
"""
