"""Load (issue 7): the soak benchmark's plumbing (a few seconds; the real soak is
``morphocam-bench soak``), and Triton's queue policy turning overload into fast, clear rejections."""

from __future__ import annotations

import functools
import json
import queue
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc as grpcclient  # noqa: E402

from test_serving import EXPLAIN, MODEL, real_frames  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_exported_configs_bound_their_queues(serving_repository):
    from tritonclient.grpc import model_config_pb2 as mc

    from morphocam.export.pbtxt import parse

    from morphocam.export.config import ExportConfig

    exported = ExportConfig()  # the serving repository is exported with the defaults
    for name in (MODEL, EXPLAIN):
        cfg = parse(serving_repository / name / "config.pbtxt")
        policy = cfg.dynamic_batching.default_queue_policy
        assert policy.max_queue_size > 0 and policy.default_timeout_microseconds > 0, name  # 0 means unbounded
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
    policy = parse(serving_repository / MODEL / "config.pbtxt").dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.default_timeout_microseconds) == (exported.max_queue_size,
                                                                          exported.queue_timeout_us)


def _on_reply(done, i, result, error):
    done.put((i, result, error, time.monotonic()))


def test_overload_is_rejected_fast_with_a_clear_message(serving_repository, tmp_path):
    from morphocam.export.pbtxt import parse, to_text
    from morphocam.contract import InputContract
    from morphocam.serving.launcher import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(serving_repository / MODEL, repo / MODEL, symlinks=True)
    cfg = parse(repo / MODEL / "config.pbtxt")
    cfg.dynamic_batching.default_queue_policy.max_queue_size = 2
    cfg.dynamic_batching.max_queue_delay_microseconds = 0
    (repo / MODEL / "config.pbtxt").write_text(to_text(cfg))
    contract = InputContract.load(repo / MODEL / "1" / "contract.json")
    frames, _ = real_frames(contract, 8)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=180) as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        done: "queue.Queue" = queue.Queue()
        n = 48
        sent = {}
        try:
            for i in range(n):
                inp = grpcclient.InferInput("IMAGES", list(frames.shape), "UINT8")
                inp.set_data_from_numpy(frames)
                sent[i] = time.monotonic()
                c.async_infer(MODEL, [inp], callback=functools.partial(_on_reply, done, i), client_timeout=60)
            results = [done.get(timeout=60) for _ in range(n)]  # none hangs
            ok = [r for r in results if r[2] is None]
            rejected = [r for r in results if r[2] is not None]
            fast = [t - sent[i] for i, _, e, t in rejected]
            print(f"{len(ok)} answered, {len(rejected)} rejected; rejection latency max {max(fast) * 1000:.0f} ms; "
                  f"message: {rejected[0][2] if rejected else '-'}")
            assert ok and rejected
            assert all("queue" in str(e).lower() for _, _, e, _ in rejected), str(rejected[0][2])
            assert max(fast) < 5.0
            assert c.is_model_ready(MODEL)
            one = grpcclient.InferInput("IMAGES", list(frames[:1].shape), "UINT8")
            one.set_data_from_numpy(frames[:1])
            probs = c.infer(MODEL, [one], client_timeout=30).as_numpy("PROBABILITIES")
            assert probs.shape == (1, contract.num_classes)
        finally:
            c.close()


@pytest.mark.slow
def test_soak_smoke(serving_repository, tmp_path):
    from morphocam.benchmarks.cli import main

    out = tmp_path / "soak"
    code = main(["soak", "--model-repository", str(serving_repository), "--model", MODEL, "--images",
                 str(REPO / "samples" / "hushem"), "--output-dir", str(out), "--minutes", "0.08",
                 "--baseline-seconds", "3", "--in-flight", "4", "--explain-ratio", "0.25", "--timeout-s", "30"])
    result = json.loads((out / "soak.json").read_text())
    assert (out / "soak.png").stat().st_size > 0
    assert result["failed_requests"] == 0, result["mixed"]["failures_by_message"]
    assert result["baseline_classify_only"]["classify"]["requests"] > 0
    assert result["mixed"]["classify"]["requests"] > 0 and result["mixed"]["explain"]["requests"] > 0
    assert result["shm_segments_after_shutdown"] == []
    assert any(k.startswith("stub:") for k in result["rss_mib"]["start"])
    # every process's RSS growth over the mixed phase is measured and within the soak's stated bound
    assert set(result["rss_mib"]["growth"]) == set(result["rss_mib"]["start"])
    assert result["rss_within_bound"] is True, result["rss_mib"]["growth"]
    assert code == 0
