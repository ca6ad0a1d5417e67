"""The serving benchmark's figure: served throughput and p99 latency against requests in flight."""

from __future__ import annotations

from pathlib import Path

from morphocam import plotting


def plot(result: dict, path: Path) -> None:
    fig, (a1, a2) = plotting.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["transport"], r["frames_per_request"]) for r in result["served"]}):
        rows = [r for r in result["served"] if (r["transport"], r["frames_per_request"]) == key]
        label = f"{key[0]}, {key[1]} frame(s)/request"
        a1.plot([r["concurrency"] for r in rows], [r["images_per_s"] for r in rows], "o-", label=label)
        a2.plot([r["concurrency"] for r in rows], [r["p99_ms"] for r in rows], "o-", label=label)
    pa = result.get("perf_analyzer")
    if isinstance(pa, dict):
        a1.plot([pa["concurrency"]], [pa["images_per_s"]], "k*", ms=10, label="perf_analyzer")
        a2.plot([pa["concurrency"]], [pa["p99_ms"]], "k*", ms=10, label="perf_analyzer")
    a1.axhline(result["ceiling_images_per_s"], color="k", ls="--", label=f"in-process ceiling ({result['ceiling']})")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests in flight")
        ax.legend(fontsize=7)
    a1.set_ylabel("images/s")
    a2.set_ylabel("p99 latency (ms)")
    fig.suptitle(f"{result['model']} on {result['cores']} CPU cores (client on the same cores)")
    plotting.save(fig, path)
