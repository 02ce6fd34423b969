"""The out-of-core dask fit against a direct in-memory NumPy computation of SPEC §1."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from soapflow.cluster import dask_client
from soapflow.config import Auto, FitParams
from soapflow.errors import SoapError
from soapflow.fit import fit_stores, fit_to_artifact
from soapflow.storage.feature_store import FeatureStore
from storehelp import positional_tokens, write_store

EPS = 1e-12


def reference_soap(real, synth, mu=2.0, tau=0.05, gamma=1.0, threshold=0.75, align_to=None):
    """SPEC §1 written out directly, all in memory, float64 — independent of soapflow.method.

    Eigenvector signs are arbitrary; ``align_to`` (components as rows) picks the same signs
    so that P and Q can be compared entry by entry (scores and projector do not depend on it).
    """
    real = real.astype(np.float64)
    synth = synth.astype(np.float64)
    n, h, w, d = real.shape
    z = real.reshape(-1, d)
    m = z.mean(0)
    c = (z - m).T @ (z - m) / (len(z) - 1)
    lam, vec = np.linalg.eigh(c)
    idx = np.argsort(lam)[::-1]
    lam, v = lam[idx], vec[:, idx]  # columns in rank order
    if align_to is not None:
        v = v * np.sign(np.sum(v.T * align_to, axis=1))
    p = ((real - m) @ v > 0).mean(0)
    q = ((synth - m) @ v > 0).mean(0)
    p, q = np.clip(p, EPS, 1 - EPS), np.clip(q, EPS, 1 - EPS)
    e = 2 * (p * q + (1 - p) * (1 - q)) ** gamma / (np.sqrt(p**2 + (1 - p) ** 2) + np.sqrt(q**2 + (1 - q) ** 2) + EPS)
    s = np.clip(e, EPS, 1 - EPS).mean((0, 1))
    if mu == "auto":
        mu = float((s > threshold).sum())
    w_ = np.zeros(d)
    if mu > 0:
        for k, comp in enumerate(np.argsort(-s, kind="stable")):
            w_[comp] = s[comp] * (1 / (1 + np.exp(-(mu - 0.5 - k) / tau)))
    proj = np.eye(d) - v @ np.diag(w_) @ v.T
    return dict(mean=m, eigenvalues=lam, components=v.T, p=p, q=q, scores=s, weights=w_, projector=proj, mu=mu)


@pytest.fixture(scope="module")
def client():
    with dask_client() as c:
        yield c


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    real = positional_tokens(64, seed=0)
    synth = positional_tokens(40, seed=1, scale=0.3)
    write_store(root / "real", real, chunk=9)
    write_store(root / "synth", synth, chunk=16)
    return root, real, synth


@pytest.mark.parametrize("mu", [2.0, "auto", 0.0, 3.5])
def test_fit_equals_in_memory_reference(client, stores, mu):
    root, real, synth = stores
    fit, inputs = fit_stores(str(root / "real"), str(root / "synth"), FitParams.parse(mu), client=client,
                             progress=False)
    ref = reference_soap(real, synth, mu=mu, align_to=fit.components)
    np.testing.assert_allclose(fit.mean, ref["mean"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(fit.eigenvalues, ref["eigenvalues"], rtol=1e-9)
    np.testing.assert_allclose(fit.scores, ref["scores"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit.weights, ref["weights"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit.projector, ref["projector"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit.p, ref["p"], atol=1e-12)
    np.testing.assert_allclose(fit.q, ref["q"], atol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(fit.components * ref["components"], axis=1)), 1, atol=1e-9)
    assert fit.mu == ref["mu"]
    assert inputs.n_real_tokens == 64 * 20 and inputs.n_synth_images == 40
    if mu == 0.0:
        assert np.array_equal(fit.projector, np.eye(12))


def test_positional_components_are_found(client, stores):
    root, _, _ = stores
    fit, _ = fit_stores(str(root / "real"), str(root / "synth"), FitParams(mu=Auto()), client=client, progress=False)
    # the fixed positional pattern makes real and synthetic activations agree on some components
    assert fit.mu >= 1
    assert fit.scores.max() > 0.9
    top = np.argsort(-fit.scores)[: int(fit.mu)]
    assert np.all(fit.weights[top] > 0.5 * fit.scores[top])


def test_auto_mu_zero_gives_identity(client, tmp_path):
    # real and synthetic tokens unrelated → low scores → μ = 0 → Pφ = I
    rng = np.random.default_rng(5)
    write_store(tmp_path / "r", rng.normal(size=(30, 3, 3, 6)), chunk=8)
    write_store(tmp_path / "s", rng.normal(size=(30, 3, 3, 6)) * 0.01 + 100, chunk=8)
    fit, _ = fit_stores(str(tmp_path / "r"), str(tmp_path / "s"), FitParams(mu=Auto(0.999)), client=client, progress=False)
    assert fit.mu == 0
    assert np.array_equal(fit.projector, np.eye(6))


def test_suppress_removes_listed_components(client, stores):
    root, real, _ = stores
    fit, _ = fit_stores(str(root / "real"), str(root / "synth"), FitParams(suppress=[0, 3]), client=client, progress=False)
    v = fit.components
    expected = np.eye(12) - v[[0, 3]].T @ v[[0, 3]]
    np.testing.assert_allclose(fit.projector, expected, atol=1e-12)
    corrected = real.reshape(-1, 12).astype(np.float64) @ fit.projector.T
    np.testing.assert_allclose(corrected @ v[0], 0, atol=1e-9)
    with pytest.raises(SoapError, match="out of range"):
        fit_stores(str(root / "real"), str(root / "synth"), FitParams(suppress=[12]), client=client, progress=False)


def _tensors_hash(path):
    return hashlib.sha256((path / "soap.safetensors").read_bytes()).hexdigest()


def test_chunk_and_worker_invariance(tmp_path, monkeypatch):
    """Same tokens, different chunkings, 1 and 2 worker processes → bit-identical tensors."""
    import soapflow.fit as fit_module

    monkeypatch.setattr(fit_module, "BLOCK_BYTES", 7 * 20 * 12 * 2)  # several blocks even for tiny stores
    real = positional_tokens(61, seed=3)
    synth = positional_tokens(33, seed=4, scale=0.5)
    hashes = set()
    for chunk_r, chunk_s, workers in ((5, 33, 1), (61, 4, 2), (13, 7, 2)):
        d = tmp_path / f"c{chunk_r}-{workers}"
        write_store(d / "real", real, chunk=chunk_r)
        write_store(d / "synth", synth, chunk=chunk_s)
        path, _, manifest = fit_to_artifact(str(d / "real"), str(d / "synth"), str(d / "art"), workers=workers,
                                            plots=False, progress=False)
        assert manifest["content_hash"] == _tensors_hash(path)
        hashes.add(manifest["content_hash"])
    assert len(hashes) == 1


def test_float16_store_is_accumulated_in_float64(client, tmp_path):
    # large offset + small spread: float32 accumulation of Σz² loses these eigenvalues
    rng = np.random.default_rng(0)
    tokens = (rng.normal(size=(200, 4, 4, 8)) * 0.01 + 300).astype(np.float16)
    write_store(tmp_path / "r", tokens, chunk=16, dtype="float16")
    write_store(tmp_path / "s", tokens[:50], chunk=16, dtype="float16")
    fit, _ = fit_stores(str(tmp_path / "r"), str(tmp_path / "s"), client=client, progress=False)
    z = tokens.astype(np.float64).reshape(-1, 8)
    expected = np.sort(np.linalg.eigvalsh(np.cov(z, rowvar=False)))[::-1]
    np.testing.assert_allclose(fit.eigenvalues, expected, rtol=1e-7)


# --- bad input --------------------------------------------------------------------------


def test_nan_tokens_name_store_and_first_bad_chunk(client, tmp_path):
    store = write_store(tmp_path / "r", positional_tokens(40), chunk=5)
    store.tokens[23, 1, 2, 3] = np.nan  # corrupted after writing: the writer itself refuses NaN
    store.tokens[37, 0, 0, 0] = np.inf
    write_store(tmp_path / "s", positional_tokens(10), chunk=5)
    with pytest.raises(SoapError, match=r"r: NaN/Inf tokens in chunk 4 \(images 20–24\), first at image 23"):
        fit_stores(str(tmp_path / "r"), str(tmp_path / "s"), client=client, progress=False)
    with pytest.raises(SoapError, match=r"r: NaN/Inf tokens in chunk 4"):
        fit_stores(str(tmp_path / "s"), str(tmp_path / "r"), client=client, progress=False)


def test_mismatched_stores_name_both_values(client, tmp_path):
    write_store(tmp_path / "a", positional_tokens(10, d=12), chunk=5)
    write_store(tmp_path / "d", positional_tokens(10, d=8), chunk=5)
    write_store(tmp_path / "g", positional_tokens(10, h=3, d=12), chunk=5)
    write_store(tmp_path / "l", positional_tokens(10, d=12), chunk=5, attrs={"layer": 7})
    write_store(tmp_path / "b", positional_tokens(10, d=12), chunk=5, attrs={"backbone": "other"})
    a = str(tmp_path / "a")
    with pytest.raises(SoapError, match=r"token dim D: .*a has 12, .*d has 8"):
        fit_stores(a, str(tmp_path / "d"), client=client, progress=False)
    with pytest.raises(SoapError, match=r"grid: .*a has \[4, 5\], .*g has \[3, 5\]"):
        fit_stores(a, str(tmp_path / "g"), client=client, progress=False)
    with pytest.raises(SoapError, match=r"layer: .*a has 3, .*l has 7"):
        fit_stores(a, str(tmp_path / "l"), client=client, progress=False)
    with pytest.raises(SoapError, match=r"backbone: .*'test-vit', .*'other'"):
        fit_stores(a, str(tmp_path / "b"), client=client, progress=False)
    # tokens after the final norm vs a store without the attribute (written before the norm)
    write_store(tmp_path / "n", positional_tokens(10, d=12), chunk=5, attrs={"final_norm": True})
    with pytest.raises(SoapError, match=r"final_norm: .*n has True, .*a has False"):
        fit_stores(str(tmp_path / "n"), a, client=client, progress=False)


def test_manifest_records_final_norm(client, tmp_path):
    real, synth = positional_tokens(20, seed=0), positional_tokens(20, seed=1, scale=0.3)
    for norm in (True, False):
        write_store(tmp_path / f"r{norm}", real, chunk=8, attrs={"final_norm": norm})
        write_store(tmp_path / f"s{norm}", synth, chunk=8, attrs={"final_norm": norm})
        _, _, manifest = fit_to_artifact(str(tmp_path / f"r{norm}"), str(tmp_path / f"s{norm}"),
                                         str(tmp_path / f"a{norm}"), plots=False, progress=False)
        assert manifest["final_norm"] is norm and manifest["stores"]["real"]["final_norm"] is norm
    write_store(tmp_path / "r_old", real, chunk=8)
    write_store(tmp_path / "s_old", synth, chunk=8)
    _, _, manifest = fit_to_artifact(str(tmp_path / "r_old"), str(tmp_path / "s_old"), str(tmp_path / "a_old"),
                                     plots=False, progress=False)
    assert manifest["final_norm"] is False  # stores from before the attribute: pre-norm


def test_missing_tokens_empty_and_incomplete_stores(client, tmp_path):
    import zarr

    from soapflow.storage.feature_store import FeatureStore

    zarr.open_group(str(tmp_path / "notokens"), mode="w").create_array("other", shape=(3,), dtype="f4")
    g = zarr.open_group(str(tmp_path / "empty"), mode="w")
    g.create_array("tokens", shape=(0, 4, 5, 12), chunks=(4, 4, 5, 12), dtype="f4")
    write_store(tmp_path / "ok", positional_tokens(10), chunk=5)
    partial = FeatureStore.create(str(tmp_path / "partial"), count=10, grid=(4, 5), dim=12, chunk=5,
                                  attrs={"backbone": "test-vit", "layer": 3})
    partial.write_chunk(1, positional_tokens(5))
    ok = str(tmp_path / "ok")
    with pytest.raises(SoapError, match=r"notokens: no 'tokens' array"):
        fit_stores(str(tmp_path / "notokens"), ok, client=client, progress=False)
    with pytest.raises(SoapError, match=r"empty is empty"):
        fit_stores(str(tmp_path / "empty"), ok, client=client, progress=False)
    with pytest.raises(SoapError, match=r"partial is incomplete: 1 of 2 chunks not written \(first: chunk 0\)"):
        fit_stores(ok, str(tmp_path / "partial"), client=client, progress=False)
    with pytest.raises(SoapError, match=r"no zarr v3 group"):
        fit_stores(str(tmp_path / "nowhere"), ok, client=client, progress=False)


def test_foreign_store_with_only_tokens_is_fitted(client, tmp_path):
    import zarr

    tokens = positional_tokens(24)
    g = zarr.open_group(str(tmp_path / "foreign"), mode="w")
    g.create_array("tokens", data=tokens, chunks=(24, 2, 5, 12))  # chunked in H too: still readable
    write_store(tmp_path / "s", positional_tokens(10, seed=9), chunk=5)
    fit, _ = fit_stores(str(tmp_path / "foreign"), str(tmp_path / "s"), client=client, progress=False)
    ref = reference_soap(tokens, positional_tokens(10, seed=9))
    np.testing.assert_allclose(fit.projector, ref["projector"], atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--mu", "-1"], "--mu must be ≥ 0"),
    (["--mu", "lots"], "--mu must be a number"),
    (["--tau", "0"], "--tau must be > 0"),
    (["--suppress", "a,b"], "--suppress takes"),
])
def test_cli_rejects_bad_parameters_in_one_line(stores, tmp_path, args, message):
    root, _, _ = stores
    result = subprocess.run([sys.executable, "-m", "soapflow.cli", "fit", str(root / "real"), str(root / "synth"),
                             "--out", str(tmp_path / "a"), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()


def test_cli_fit_writes_artifact_and_plots(stores, tmp_path):
    root, real, synth = stores
    out = tmp_path / "art"
    result = subprocess.run([sys.executable, "-m", "soapflow.cli", "fit", str(root / "real"), str(root / "synth"),
                             "--out", str(out), "--mu", "auto"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "components suppressed" in result.stdout
    tensors = load_file(str(out / "soap.safetensors"))
    ref = reference_soap(real, synth, mu="auto")
    np.testing.assert_allclose(tensors["projector"], ref["projector"], atol=1e-6)
    assert tensors["projector"].dtype == np.float32 and tensors["mean"].dtype == np.float64
    assert tensors["p"].shape == (4, 5, 12)
    for png in ("si_scores.png", "response_maps.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _peak_rss_of_fit(real, synth, out):
    """Peak RSS (bytes) of a `soap fit` process, via wait4's rusage of that child alone."""
    import os

    proc = subprocess.Popen([sys.executable, "-m", "soapflow.cli", "fit", str(real), str(synth), "--out", str(out),
                             "--no-plots"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss * 1024


def test_fit_memory_is_bounded_by_blocks_not_by_n(tmp_path):
    """8× more tokens (2.2 GB more as float64) must not raise the fit's peak memory noticeably."""
    h, w, d = 16, 16, 384
    rng = np.random.default_rng(0)
    for name, n in (("small", 400), ("large", 3200)):
        store = FeatureStore.create(str(tmp_path / name), count=n, grid=(h, w), dim=d, chunk=50,
                                    attrs={"backbone": "test-vit", "layer": 3})
        for i in store.pending_chunks():
            rows = store.chunk_range(i)
            store.write_chunk(i, rng.standard_normal((len(rows), h, w, d), dtype=np.float32))
        store.finalize()
    small = _peak_rss_of_fit(tmp_path / "small", tmp_path / "small", tmp_path / "a1")
    large = _peak_rss_of_fit(tmp_path / "large", tmp_path / "small", tmp_path / "a2")
    float64_growth = (3200 - 400) * h * w * d * 8
    assert large - small < 0.15 * float64_growth, (small / 2**20, large / 2**20)


def _fit_on(address, real_uri, synth_uri, out_dir):
    path, fit, _ = fit_to_artifact(real_uri, synth_uri, out_dir, cluster=address, plots=False, progress=False)
    return float(fit.scores.sum())


def test_a_fit_run_as_a_task_on_its_own_cluster_of_one_thread_finishes(stores, tmp_path):
    """The refit flow under DaskTaskRunner runs the fit as a task on the cluster it submits its
    leaves to; with one-thread workers the leaves need the very thread the fit holds."""
    from distributed import Client, LocalCluster

    root, real, synth = stores
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        future = c.submit(_fit_on, cluster.scheduler_address, str(root / "real"), str(root / "synth"),
                          str(tmp_path / "art"), pure=False)
        total = future.result(timeout=120)  # without leaving the worker's pool it waits forever
    ref = reference_soap(real, synth)
    assert total == pytest.approx(ref["scores"].sum(), rel=1e-9)
