"""The fit at scale: thread count from the machine, bounded memory, torch/CUDA leaves exact."""

import hashlib
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from soapflow import fit_device, method
from soapflow.cluster import MEMORY_FRACTION, bounded_count, dask_client, local_threads, machine
from soapflow.config import Auto, FitParams
from soapflow.errors import SoapError
from soapflow.fit import LEAF_BYTES, fit_stores, fit_to_artifact, resolve_device
from soapflow.storage.feature_store import FeatureStore
from storehelp import positional_tokens, write_store

GiB = 2**30
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --- threads from cores and memory ----------------------------------------------------------


@pytest.mark.parametrize("cores, available, expected", [
    (16, 128 * GiB, 16),  # the H200 machine: every core
    (2, 22 * GiB, 2),
    (64, 4 * GiB, 8),  # many cores, little memory: as many leaves as fit in half of it
    (8, 100 * 2**20, 1),  # never fewer than one
])
def test_thread_count_follows_cores_and_free_memory(cores, available, expected):
    assert bounded_count(cores, available, LEAF_BYTES) == expected


def test_blocks_in_flight_stay_within_the_memory_share():
    for cores in (1, 2, 3, 8, 16, 64, 256):
        for available in (GiB // 4, GiB, 3 * GiB, 16 * GiB, 128 * GiB, 2048 * GiB):
            threads = bounded_count(cores, available, LEAF_BYTES)
            assert 1 <= threads <= cores
            assert threads == 1 or threads * LEAF_BYTES <= MEMORY_FRACTION * available
            if threads < cores:  # memory, not cores, was the limit: one more would not fit
                assert (threads + 1) * LEAF_BYTES > MEMORY_FRACTION * available


def test_local_cluster_runs_the_threads_the_machine_allows(monkeypatch):
    monkeypatch.delenv("SOAPFLOW_FIT_THREADS", raising=False)
    cores, available = machine()
    assert cores == len(os.sched_getaffinity(0)) or cores < len(os.sched_getaffinity(0))  # a cgroup quota may cut it
    expected = bounded_count(cores, available, LEAF_BYTES)
    assert local_threads(LEAF_BYTES) == expected
    with dask_client() as client:  # a fit leaf's memory by default
        assert list(client.nthreads().values()) == [expected]
    monkeypatch.setenv("SOAPFLOW_FIT_THREADS", "3")
    with dask_client(thread_bytes=LEAF_BYTES) as client:
        assert list(client.nthreads().values()) == [3]
    monkeypatch.setenv("SOAPFLOW_FIT_THREADS", "many")
    with pytest.raises(SoapError, match="SOAPFLOW_FIT_THREADS must be a whole number ≥ 1, got 'many'"):
        local_threads(LEAF_BYTES)


def _peak_rss_of_fit(real, synth, out, threads):
    # Launched from a small intermediate process: a child's ru_maxrss starts at its parent's RSS at
    # fork, and the test process can be gigabytes into a full test run.
    launcher = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
                "_, status, usage = os.wait4(p.pid, 0); print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")
    cmd = [sys.executable, "-m", "soapflow.cli", "fit", str(real), str(synth), "--out", str(out), "--no-plots",
           "--device", "cpu"]
    done = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True, text=True,
                          env={**os.environ, "SOAPFLOW_FIT_THREADS": str(threads)})
    code, maxrss = done.stdout.split()
    assert code == "0", done.stderr[-2000:]
    return int(maxrss) * 1024


def test_memory_per_thread_stays_within_the_leaf_allowance(tmp_path):
    """4 threads instead of 1 on enough blocks: the peak grows by at most 3 × LEAF_BYTES, the
    per-thread allowance the thread count is computed with."""
    h, w, d = 16, 16, 384
    n = 8 * 170  # 8 blocks of 170 images (32 MiB of float16 each)
    store = FeatureStore.create(str(tmp_path / "r"), count=n, grid=(h, w), dim=d, chunk=85, dtype="float16",
                                attrs={"backbone": "test-vit", "layer": 3})
    rng = np.random.default_rng(0)
    for i in store.pending_chunks():
        rows = store.chunk_range(i)
        store.write_chunk(i, rng.standard_normal((len(rows), h, w, d), dtype=np.float32))
    store.finalize()
    one = _peak_rss_of_fit(tmp_path / "r", tmp_path / "r", tmp_path / "a1", 1)
    four = _peak_rss_of_fit(tmp_path / "r", tmp_path / "r", tmp_path / "a4", 4)
    growth = (four - one) / 2**20, LEAF_BYTES / 2**20
    assert four - one <= 3 * LEAF_BYTES, growth
    assert four - one > LEAF_BYTES, growth  # the 4 threads did hold blocks at once: the allowance was tested


# --- exact activation decisions, NumPy and torch ----------------------------------------------


def _exact_counts(tokens, mean, components):
    """Σ_images 1[(z − m)·v > 0] in rational arithmetic, entry by entry: the definition."""
    n, h, w, d = tokens.shape
    m = [Fraction(float(x)) for x in mean]
    counts = np.zeros((h, w, len(components)), np.int64)
    for i, y, x in np.ndindex(n, h, w):
        a = [Fraction(float(t)) - mt for t, mt in zip(tokens[i, y, x], m)]
        for c, v in enumerate(components):
            counts[y, x, c] += sum(ai * Fraction(float(vi)) for ai, vi in zip(a, v)) > 0
    return counts


def _near_ties(dtype):
    """16 tokens (4 images of 2×2) on, and one ulp off, the hyperplanes of v0 = (e0 + e1)/√2 and
    v1 = e2 through the mean, where float32 (and for float64 tokens float64) cannot tell the sign."""
    d = 6
    rng = np.random.default_rng(7)
    mean = np.r_[0, 0, 0, rng.normal(size=d - 3)].astype(np.float32).astype(np.float64)
    basis = np.linalg.qr(np.c_[[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], rng.normal(size=(d, d - 2))])[0].T
    basis[0], basis[1] = np.array([1, 1, 0, 0, 0, 0]) / np.sqrt(2), np.eye(d)[2]
    rows = []
    for t in (0.5, 3.0, 100.0):
        for step in (0, np.inf, -np.inf):
            z = mean.astype(dtype) + np.r_[0, 0, 0, rng.normal(size=d - 3)].astype(dtype)
            z[0], z[1] = t, np.nextafter(dtype(-t), dtype(step)) if step else -t
            rows.append(z)
    rows.append(mean.astype(dtype))  # a token equal to the mean: every projection exactly 0
    rows += list(rng.normal(size=(6, d)).astype(dtype) + mean.astype(dtype))
    return np.array(rows, dtype).reshape(4, 2, 2, d), mean, basis


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_activation_decisions_are_the_exact_signs(dtype):
    tokens, mean, components = _near_ties(np.float64 if dtype == np.float64 else np.float32)
    tokens = tokens.astype(dtype)
    expected = _exact_counts(tokens, mean, components)
    np.testing.assert_array_equal(method.activation_counts(tokens, mean, components), expected)
    block = torch.from_numpy(tokens)
    np.testing.assert_array_equal(fit_device.activation_counts(block, mean, components, torch.device("cpu")), expected)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # float32 GEMMs may use bf16: the leaf must project in float64
    try:
        assert fit_device.tf32_allowed(torch.device("cpu"))
        np.testing.assert_array_equal(fit_device.activation_counts(block, mean, components, torch.device("cpu")),
                                      expected)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert not fit_device.tf32_allowed(torch.device("cpu"))


def test_exact_tier_decides_what_float64_cannot():
    v = np.array([[1.0, 1.0, 0.0]]) / np.sqrt(2)
    z = np.array([[3.0, -3.0, 5.0], [3.0, np.nextafter(-3.0, 0), 0.0], [3.0, np.nextafter(-3.0, -9), 1.0]])
    mean = np.zeros(3)
    assert method.exact_signs(z, mean, np.repeat(v, 3, axis=0)).tolist() == [False, True, False]
    assert method.recheck_signs(z, mean, np.repeat(v, 3, axis=0)).tolist() == [False, True, False]
    assert method.recheck_signs(z, mean, v[0]).tolist() == [False, True, False]  # one component for all rows



def _rational_sign(z, mean, v) -> int:
    total = sum((Fraction(float(x)) - Fraction(float(m))) * Fraction(float(c)) for x, m, c in zip(z, mean, v))
    return (total > 0) - (total < 0)


def test_exact_signs_agree_with_rational_arithmetic_on_ties_cancellations_and_underflow():
    """The error-free float path (TwoSum, TwoProduct, fsum) and its fraction fallback against
    rational arithmetic, on rows built to be undecidable in float64."""
    rng = np.random.default_rng(3)
    d = 24
    mean = rng.normal(size=d) * 10
    rows, comps = [], []
    for k in range(300):
        v = rng.normal(size=d)
        v /= np.linalg.norm(v)
        w = rng.normal(size=d) * 10.0 ** rng.integers(-6, 4)
        z = mean + w - (w @ v) * v  # on the hyperplane through the mean, up to rounding
        kind = k % 6
        if kind == 1:
            z = z.astype(np.float32).astype(np.float64)  # a float32 token
        elif kind == 2:
            z = mean.copy()  # equal to the mean: 0, not active
            z[k % d] = np.nextafter(z[k % d], np.inf)
        elif kind == 3:
            v[rng.integers(d)] = 1e-300  # products that underflow: the fraction fallback
            z[rng.integers(d)] += 1e-30
        elif kind == 4:
            z = mean.copy()
        elif kind == 5:
            z = z + rng.normal(size=d) * 1e-13  # off the plane by a few ulps, either side
        rows.append(z)
        comps.append(v)
    z, v = np.array(rows), np.array(comps)
    expected = [_rational_sign(zi, mean, vi) > 0 for zi, vi in zip(z, v)]
    assert method.exact_signs(z, mean, v).tolist() == expected
    assert 30 < sum(expected) < 270  # both signs occur: the rows are near ties, not one-sided
    assert method.exact_signs(z[:0], mean, v[:0]).shape == (0,)

# --- whole fits: torch leaves (the CUDA code) against NumPy leaves -----------------------------


@pytest.fixture(scope="module")
def client():
    with dask_client(thread_bytes=LEAF_BYTES) as c:
        yield c


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    write_store(root / "real", positional_tokens(90, seed=0), chunk=9)
    write_store(root / "synth", positional_tokens(50, seed=1, scale=0.3), chunk=16)
    write_store(root / "real16", positional_tokens(90, h=7, w=7, d=40, seed=2), chunk=11, dtype="float16")
    write_store(root / "synth16", positional_tokens(60, h=7, w=7, d=40, seed=3, scale=0.3), chunk=8, dtype="float16")
    import zarr

    foreign = zarr.open_group(str(root / "foreign"), mode="w")  # another tool's store: chunked in H too
    foreign.create_array("tokens", data=positional_tokens(45, seed=4), chunks=(10, 2, 5, 12))
    return root


def _assert_same_fit(a, b):
    np.testing.assert_allclose(a.projector, b.projector, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9)
    np.testing.assert_array_equal(a.p, b.p)  # identical activation decisions
    np.testing.assert_array_equal(a.q, b.q)
    assert a.mu == b.mu


def _fit(client, root, real, synth, device, monkeypatch):
    import soapflow.fit as fit_module

    monkeypatch.setattr(fit_module, "BLOCK_BYTES", 7 * 49 * 40 * 2)  # several blocks per store
    return fit_stores(str(root / real), str(root / synth), FitParams(mu=Auto()), client=client, device=device,
                      progress=False)[0]


@pytest.mark.parametrize("device", ["torch-cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("real, synth", [("real", "synth"), ("real16", "synth16"), ("foreign", "synth")])
def test_device_fit_equals_cpu_fit(client, stores, monkeypatch, device, real, synth):
    cpu = _fit(client, stores, real, synth, "cpu", monkeypatch)
    other = _fit(client, stores, real, synth, device, monkeypatch)
    _assert_same_fit(other, cpu)
    again = _fit(client, stores, real, synth, device, monkeypatch)
    for name in ("projector", "scores", "components", "eigenvalues", "p", "q", "mean"):
        assert getattr(again, name).tobytes() == getattr(other, name).tobytes(), name  # bit-identical run to run


def test_torch_leaves_report_nan_like_numpy_leaves(client, tmp_path):
    store = write_store(tmp_path / "r", positional_tokens(40), chunk=5)
    store.tokens[23, 1, 2, 3] = np.nan
    write_store(tmp_path / "s", positional_tokens(10), chunk=5)
    for real, synth in (("r", "s"), ("s", "r")):
        with pytest.raises(SoapError, match=r"r: NaN/Inf tokens in chunk 4 \(images 20–24\), first at image 23"):
            fit_stores(str(tmp_path / real), str(tmp_path / synth), client=client, device="torch-cpu", progress=False)


def test_device_choice_is_checked_before_any_work(client, stores):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(client, None) == resolve_device(client, "auto") == expected
    with pytest.raises(SoapError, match=r"--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        fit_stores(str(stores / "real"), str(stores / "synth"), client=client, device="gpu", progress=False)
    with pytest.raises(SoapError, match=r"--device cuda:99: no such CUDA device on this machine"):
        fit_stores(str(stores / "real"), str(stores / "synth"), client=client, device="cuda:99", progress=False)


def test_cli_rejects_a_bad_device_in_one_line(stores, tmp_path):
    result = subprocess.run([sys.executable, "-m", "soapflow.cli", "fit", str(stores / "real"), str(stores / "synth"),
                             "--out", str(tmp_path / "a"), "--device", "tpu"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --device must be auto, cpu, cuda or cuda:N, got 'tpu'"]
    assert not (tmp_path / "a").exists()


@cuda
def test_cuda_artifact_is_bit_identical_run_to_run_and_close_to_cpu(stores, tmp_path):
    hashes = set()
    for run in range(2):
        path, fit, manifest = fit_to_artifact(str(stores / "real16"), str(stores / "synth16"), str(tmp_path / f"g{run}"),
                                              device="cuda", plots=False, progress=False)
        hashes.add(hashlib.sha256((path / "soap.safetensors").read_bytes()).hexdigest())
    _, cpu, _ = fit_to_artifact(str(stores / "real16"), str(stores / "synth16"), str(tmp_path / "c"), device="cpu",
                                plots=False, progress=False)
    assert len(hashes) == 1
    _assert_same_fit(fit, cpu)
