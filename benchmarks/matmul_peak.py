"""The machine's FP32 matrix-multiply peak, and the compute bound it puts on the classifier."""

from __future__ import annotations

import time

import numpy as np

GFLOP_PER_IMAGE_224 = 0.77  # EfficientNet-B0 + CBAM at 224x224 (NOTES.md); scales with pixels


def gflop_per_image(height: int, width: int) -> float:
    return GFLOP_PER_IMAGE_224 * height * width / 224 ** 2


def _best_matmul_gflops(matmul, a, repeats: int) -> float:
    matmul(a, a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.shape[0] ** 3 / best / 1e9


def matmul_peak_gflops(n: int = 4096, repeats: int = 3) -> dict:
    """FP32 matrix-multiply peak of this machine with numpy (OpenBLAS) and torch (oneDNN/MKL).

    Both are measured because numpy's bundled OpenBLAS picks its kernels from the CPU model and can
    fall back to generic ones on CPUs it does not know (seen here: a new Xeon detected as
    "Prescott", 4x below torch); ``peak`` is the higher of the two.
    """
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    out = {"numpy": _best_matmul_gflops(np.matmul, a, repeats)}
    try:
        from threadpoolctl import threadpool_info

        out["numpy_openblas_kernels"] = next((i.get("architecture") for i in threadpool_info()
                                              if i.get("internal_api") == "openblas"), None)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
    try:
        import torch

        out["torch"] = _best_matmul_gflops(torch.matmul, torch.from_numpy(a), repeats)
    except ImportError:  # pragma: no cover - torch is a project dependency
        pass
    out["peak"] = max(v for k, v in out.items() if k in ("numpy", "torch"))
    return out
