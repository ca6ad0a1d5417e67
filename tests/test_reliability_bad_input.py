"""Bad input through the live server (issue 7): each row gets a clear error naming the problem, the
server keeps serving, and the next good request gives the same answer as before.

Rows already covered by ``test_serving.py`` (wrong dtype FP32, wrong height, empty batch, batch above max,
unknown model, target class above range) are not repeated here. Uses the session ``triton_server``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest


grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from test_serving import EXPLAIN, MODEL, real_frames  # noqa: E402

TIMEOUT = 30  # seconds per request: a hang fails the test instead of blocking it


@pytest.fixture(scope="module")
def reference(client, contract):
    """One real frame and the server's answer to it before any bad input was sent."""
    frame, _ = real_frames(contract, 1)
    return frame, _infer(client, frame).as_numpy("PROBABILITIES").copy()


def _input(name: str, data: np.ndarray, dtype: str, shape=None):
    inp = grpcclient.InferInput(name, list(data.shape), dtype)
    inp.set_data_from_numpy(data)
    if shape is not None:
        inp.set_shape(list(shape))
    return inp


def _infer(client, frames, model=MODEL, dtype="UINT8", extra=(), outputs=None, version="", shape=None):
    return client.infer(model, [_input("IMAGES", frames, dtype, shape), *extra], model_version=version,
                        outputs=outputs, client_timeout=TIMEOUT)


def assert_still_serving(client, reference) -> None:
    frame, probs = reference
    assert client.is_server_live() and client.is_model_ready(MODEL) and client.is_model_ready(EXPLAIN)
    again = _infer(client, frame).as_numpy("PROBABILITIES")
    np.testing.assert_allclose(again, probs, atol=1e-6)


def _target(values, dtype="INT32", np_dtype=np.int32):
    arr = np.asarray(values, np_dtype).reshape(-1, 1)
    return _input("TARGET_CLASS", arr, dtype)


def _rows(contract, max_batch: int, explain_max_batch: int):
    h, w, k = contract.height, contract.width, contract.num_classes
    one = np.zeros((1, h, w, 3), np.uint8)
    nan = np.full((1, h, w, 3), np.nan, np.float32)
    nan[0, 0, 0] = np.inf
    nan[0, 0, 1] = -np.inf
    return {
        # name: (kwargs for _infer, words the message must contain)
        # Triton reads the first axis as the batch: a bare [H,W,3] frame is "batch 224"
        "rank 3 (no batch axis)": (dict(frames=np.zeros((h, w, 3), np.uint8)), ["batch-size", f"<= {max_batch}"]),
        "rank 3 (one frame, no channel axis)": (dict(frames=np.zeros((1, h, w), np.uint8)), ["shape", "IMAGES"]),
        "rank 5": (dict(frames=np.zeros((1, 1, h, w, 3), np.uint8)), ["shape", "IMAGES"]),
        "wrong width": (dict(frames=np.zeros((1, h, w + 7, 3), np.uint8)), ["shape", str(w + 7)]),
        "4 channels (RGBA)": (dict(frames=np.zeros((1, h, w, 4), np.uint8)), ["shape", "IMAGES"]),
        "NaN/Inf float where uint8 expected": (dict(frames=nan, dtype="FP32"), ["FP32", "UINT8"]),
        "FP64 where uint8 expected": (dict(frames=one.astype(np.float64), dtype="FP64"), ["FP64", "UINT8"]),
        "declared shape does not match bytes": (dict(frames=one, shape=[2, h, w, 3]), ["byte size"]),
        "unknown version": (dict(frames=one, version="7"), ["version", "7"]),
        "unknown output name": (dict(frames=one, outputs=[grpcclient.InferRequestedOutput("EMBEDDING")]),
                                ["EMBEDDING"]),
        # the explanation model
        "explain: batch above max": (dict(frames=np.zeros((explain_max_batch + 1, h, w, 3), np.uint8), model=EXPLAIN),
                                     ["batch", str(explain_max_batch)]),
        "explain: batch 0": (dict(frames=np.zeros((0, h, w, 3), np.uint8), model=EXPLAIN), ["byte size", "got 0"]),
        "explain: wrong dtype": (dict(frames=one.astype(np.int16), dtype="INT16", model=EXPLAIN), ["INT16", "UINT8"]),
        "explain: target below -1": (dict(frames=one, model=EXPLAIN, extra=(_target([-5]),)),
                                     ["out of range", f"0..{k - 1}"]),
        "explain: target far too large": (dict(frames=one, model=EXPLAIN, extra=(_target([2**31 - 1]),)),
                                          ["out of range"]),
        "explain: target wrong dtype": (dict(frames=one, model=EXPLAIN,
                                             extra=(_target([1.5], "FP32", np.float32),)), ["FP32", "INT32"]),
        "explain: one target for two frames": (dict(frames=np.zeros((2, h, w, 3), np.uint8), model=EXPLAIN,
                                                    extra=(_target([0]),)), ["batch size does not match"]),
        "explain: unknown version": (dict(frames=one, model=EXPLAIN, version="3"), ["version", "3"]),
    }


ROWS = ["rank 3 (no batch axis)", "rank 3 (one frame, no channel axis)", "rank 5", "wrong width", "4 channels (RGBA)", "NaN/Inf float where uint8 expected",
        "FP64 where uint8 expected", "declared shape does not match bytes", "unknown version", "unknown output name",
        "explain: batch above max", "explain: batch 0", "explain: wrong dtype", "explain: target below -1",
        "explain: target far too large", "explain: target wrong dtype", "explain: one target for two frames",
        "explain: unknown version"]


@pytest.mark.parametrize("row", ROWS)
def test_bad_input_row(client, contract, reference, row):
    max_batch = {m: int(client.get_model_config(m, as_json=True)["config"]["max_batch_size"]) for m in (MODEL, EXPLAIN)}
    kwargs, words = _rows(contract, max_batch[MODEL], max_batch[EXPLAIN])[row]
    t0 = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        _infer(client, **kwargs)
    took = time.monotonic() - t0
    message = str(info.value)
    print(f"{row}: {took * 1000:.0f} ms: {message}")
    assert all(word.lower() in message.lower() for word in words), message
    assert took < 10
    assert_still_serving(client, reference)


# ------------------------------------------------------------------ ~100 MB request
def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_100mb_request_refused_by_limits_not_memory(client, contract, reference, triton_server):
    """Triton 2.51 has no gRPC request-size flag (the server accepts messages up to 2 GiB; the
    ``--http-max-input-size`` flag only exists from later releases), so the real limits are:
    (1) the client channel's ``grpc.max_send_message_length`` refuses the request before it leaves,
    (2) the server's batch-size/shape checks refuse it before any model code runs or copies it."""
    h, w = contract.height, contract.width
    n = (100 * 1000 * 1000) // (h * w * 3) + 1
    big = np.zeros((n, h, w, 3), np.uint8)
    mb = big.nbytes / 1e6
    # (1) a client with a 16 MB send limit refuses locally, with RESOURCE_EXHAUSTED.
    limited = grpcclient.InferenceServerClient(triton_server.grpc_url,
                                               channel_args=[("grpc.max_send_message_length", 16 << 20)])
    try:
        t0 = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            _infer(limited, big)
        print(f"client limit: {time.monotonic() - t0:.2f} s: {str(info.value)[:200]}")
        assert "larger than max" in str(info.value).lower() or "resource_exhausted" in str(info.value).lower()
    finally:
        limited.close()
    # (2) the stock client (2 GiB channel limit) reaches the server, which refuses the batch size.
    pid = triton_server.pid
    before = _rss_kib(pid)
    t0 = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        _infer(client, big)
    took = time.monotonic() - t0
    message = str(info.value)
    after = _rss_kib(pid)
    print(f"{mb:.0f} MB request: refused in {took:.2f} s: {message[:200]}; server RSS {before / 1024:.0f} -> "
          f"{after / 1024:.0f} MiB")
    max_batch = int(client.get_model_config(MODEL, as_json=True)["config"]["max_batch_size"])
    assert f"batch-size must be <= {max_batch}" in message
    assert took < 20
    # the server may keep the received buffer in its allocator, but it must not copy it into the
    # model (no Python stub growth by the request size times several)
    assert (after - before) / 1024 < 3 * mb
    # 100 MB with a legal batch size but a huge frame: refused by the shape check
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        _infer(client, np.zeros((1, 5774, 5774, 3), np.uint8))
    assert_still_serving(client, reference)


def test_http_rejects_oversized_body(triton_server, contract, reference, client):
    """The HTTP endpoint (binary tensor extension) of 2.51 refuses a 100 MB body with a clear error."""
    import json
    import urllib.error
    import urllib.request

    h, w = contract.height, contract.width
    n = (100 * 1000 * 1000) // (h * w * 3) + 1
    header = json.dumps({"inputs": [{"name": "IMAGES", "shape": [n, h, w, 3], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": n * h * w * 3}}]}).encode()
    body = header + bytes(n * h * w * 3)
    req = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/{MODEL}/infer", data=body,
                                 method="POST", headers={"Inference-Header-Content-Length": str(len(header)),
                                                         "Content-Type": "application/octet-stream"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            status, text = resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError) as exc:  # server closed the connection on the body
        status, text = 0, str(exc)
    took = time.monotonic() - t0
    print(f"HTTP {len(body) / 1e6:.0f} MB: status {status} in {took:.2f} s: {text[:300]}")
    assert status != 200
    assert took < 20
    assert_still_serving(client, reference)


# ------------------------------------------------------------------ property-based: random tensors
DTYPES = {"UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_, "BYTES": np.object_}


def _hypothesis_test(size_hw: tuple[int, int]):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    h, w = size_hw  # the served model's input size: near-valid shapes hit the model's own checks
    dims = st.one_of(st.sampled_from([0, 1, 2, 3, 4, h, w]), st.integers(0, 300))
    shapes = st.one_of(
        st.lists(dims, min_size=0, max_size=5),
        st.tuples(st.integers(0, 10), st.sampled_from([h, h - 1, 1]), st.sampled_from([w, w + 1]),
                  st.sampled_from([3, 1, 4])).map(list),
    )

    @settings(max_examples=25, deadline=30_000, derandomize=False,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(model=st.sampled_from(["classify", "explain"]), dtype=st.sampled_from(list(DTYPES)), shape=shapes,
           seed=st.integers(0, 2**32 - 1), target=st.one_of(st.none(), st.integers(-10, 10)))
    def check(client, contract, model, dtype, shape, seed, target):
        size = int(np.prod(shape)) if shape else 1
        if size * 8 > 8_000_000:  # keep each example small: a few MB at most
            shape = [min(d, 2) for d in shape]
            size = int(np.prod(shape)) if shape else 1
        rng = np.random.default_rng(seed)
        raw = rng.integers(0, 256, size * np.dtype(DTYPES[dtype] if dtype != "BYTES" else np.uint8).itemsize,
                           dtype=np.uint8)
        if dtype == "BYTES":
            data = np.array([bytes(rng.integers(0, 256, 5, dtype=np.uint8)) for _ in range(size)],
                            dtype=np.object_).reshape(shape)
        elif dtype == "BOOL":
            data = (raw[:size] & 1).astype(np.bool_).reshape(shape)
        else:
            data = raw.view(DTYPES[dtype]).reshape(shape)  # random bytes: NaN/Inf included for floats
        name = EXPLAIN if model == "explain" else MODEL
        extra = ()
        if model == "explain" and target is not None and shape:
            extra = (_target([target] * max(shape[0], 0)),) if shape[0] > 0 else ()
        if model == "explain" and shape and shape[0] > 8:  # explanations are ~40 ms a frame: stay fast
            shape[0] = 8
            data = data[:8]
        try:
            res = client.infer(name, [_input("IMAGES", data, dtype), *extra], client_timeout=TIMEOUT)
        except InferenceServerException as exc:
            assert str(exc).strip(), "an error must carry a message"
            assert "deadline" not in str(exc).lower(), str(exc)  # refused, not hung
        else:
            probs = res.as_numpy("PROBABILITIES")
            assert probs.shape == (shape[0], contract.num_classes)
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
            if model == "explain":
                heat = res.as_numpy("HEATMAP")
                assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
        assert client.is_server_live()

    return check


def test_property_random_tensors_get_a_result_or_a_clear_error(client, contract, reference):
    t0 = time.monotonic()
    _hypothesis_test((contract.height, contract.width))(client, contract)
    print(f"25 random requests in {time.monotonic() - t0:.1f} s")
    assert_still_serving(client, reference)
