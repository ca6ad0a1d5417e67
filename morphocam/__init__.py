"""morphocam core: the input/output contract and torch-free preprocessing shared by every stage.

Every stage (training, export, serving, clients, benchmarks) imports this package; it imports
none of them, and nothing here imports torch, so a CASA client can depend on it alone.
"""

__version__ = "0.1.0"
