"""noise_generators: SPEC §2 recipes, statistics, determinism, validation, and `soap noise preview`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.fft
import scipy.stats
import torch

from soapflow.noise_generators import GENERATORS, IMAGENET_MEAN, IMAGENET_STD, generate, generator_params
from soapflow.noise_generators import recipes, rng
from soapflow.noise_generators.dct import idct2, idct2_torch
from soapflow.errors import SoapError

NAMES = ["pink", "modulated_white", "gradient", "constant", "uniform", "gaussian", "mixture", "marginal"]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def unnorm(x):
    return x * STD + MEAN


def ctx_for(size, seed=0):
    return recipes.make_ctx(seed, size, "cpu", IMAGENET_MEAN, IMAGENET_STD)


# --- catalog, shapes ---------------------------------------------------------------------------

def test_catalog_names_and_entries():
    assert list(GENERATORS) == NAMES
    for name, entry in GENERATORS.items():
        assert entry.description and callable(entry.fn)
        json.dumps(generator_params(name))  # provenance must be JSON-able


def test_generator_params_resolves_defaults_and_overrides():
    assert generator_params("pink") == {"alpha": 1.0, "sigma": 1.0}
    assert generator_params("gradient") == {}
    p = generator_params("mixture", alpha=2, concentration=(1, 2, 3))
    assert p == {"alpha": 2.0, "sigma": 1.0, "concentration": [1.0, 2.0, 3.0]}
    assert generator_params("marginal")["weights"] == [0.05, 0.15, 0.4, 0.3, 0.1]


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_device_finite(name):
    x = generate(name, 3, 17, seed=5)
    assert x.shape == (3, 3, 17, 17) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.isfinite(x).all()
    assert generate(name, 0, 8).shape == (0, 3, 8, 8)


# --- determinism -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_window_is_bit_identical(name):
    full = generate(name, 110, 20, seed=3)
    assert torch.equal(full[100:105], generate(name, 5, 20, seed=3, start=100))
    assert torch.equal(full, generate(name, 110, 20, seed=3))


@pytest.mark.parametrize("name", NAMES)
def test_window_is_bit_identical_across_blocks(name, monkeypatch):
    # blocks of 4 images (what 224 px gets): windows that start and end mid-block
    from soapflow import noise_generators

    monkeypatch.setattr(noise_generators, "_images_per_block", lambda c, s, d: 4)
    full = generate(name, 11, 20, seed=1)
    assert torch.equal(full[5:10], generate(name, 5, 20, seed=1, start=5))
    assert torch.equal(full[3:4], generate(name, 1, 20, seed=1, start=3))
    assert not torch.equal(full[0:4], full[4:8])  # keyed by absolute index, not block position
    alone = GENERATORS[name].fn(ctx_for(20, seed=1), torch.tensor([9]), name, **generator_params(name))
    torch.testing.assert_close(full[9:10], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mixture", "marginal"])
def test_cpu_images_are_bit_identical_for_any_thread_count(name, monkeypatch):
    from soapflow import noise_generators

    monkeypatch.setattr(noise_generators, "_images_per_block", lambda c, s, d: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = generate(name, 13, 32, seed=2)
        torch.set_num_threads(3)  # blocks spread over a pool of 3 single-threaded workers
        three = generate(name, 13, 32, seed=2)
        assert torch.get_num_threads() == 3  # the pool leaves the caller's setting alone
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, three)


def test_block_size_is_a_power_of_two():
    from soapflow import noise_generators

    cpu = torch.device("cpu")
    assert noise_generators._images_per_block(3, 224, cpu) == 4
    for size in (1, 7, 20, 64, 100, 224, 512, 1000):
        b = noise_generators._images_per_block(3, size, cpu)
        assert b >= 1 and b & (b - 1) == 0


@pytest.mark.parametrize("name", NAMES)
def test_image_depends_on_index_not_on_batch(name):
    # Below generate's block alignment: the recipe itself keys every draw by the absolute index,
    # so any batch composition gives the same image (up to float rounding of batched kernels).
    ctx = ctx_for(20, seed=7)
    fn, params = GENERATORS[name].fn, generator_params(name)
    whole = fn(ctx, torch.arange(40), name, **params).clone()
    part = fn(ctx_for(20, seed=7), torch.tensor([31, 2, 17]), name, **params)
    torch.testing.assert_close(part, whole[[31, 2, 17]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_seeds_and_images_differ(name):
    a, b = generate(name, 6, 16, seed=0), generate(name, 6, 16, seed=1)
    assert not torch.equal(a, b)
    flat = a.flatten(1)
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert not torch.equal(flat[i], flat[j]), (name, i, j)


def test_components_are_independent_streams():
    # mixture's pink component is not the standalone pink set
    ctx = ctx_for(32)
    own = recipes.pink(ctx, torch.arange(50), "mixture/pink", 1.0, 1.0).clone()
    alone = generate("pink", 50, 32)
    corr = np.corrcoef(own.flatten().numpy(), alone.flatten().numpy())[0, 1]
    assert abs(corr) < 0.05


# --- random numbers and the DCT ----------------------------------------------------------------

def test_counter_rng_ranges_and_moments():
    keys = rng.image_keys(0, "test", torch.arange(8))
    u = rng.uniform(keys, 20001)
    assert u.shape == (8, 20001) and u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    z = rng.normal(keys, 20001)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    u64 = rng.uniform64(keys, 5)
    assert u64.dtype == torch.float64 and 0 < u64.min() and u64.max() < 1
    assert not torch.equal(keys, rng.image_keys(0, "other", torch.arange(8)))
    assert not torch.equal(keys, rng.image_keys(1, "test", torch.arange(8)))


def test_torch_backend_matches_numpy_backend(monkeypatch):
    # the torch code path (used on CUDA) run on CPU: same integers, same uniforms, normals to ulps
    keys = rng.image_keys(9, "test", torch.arange(5))
    ref = rng.uniform(keys, 3001), rng.uniform64(keys, 7), rng.normal(keys, 3001)
    monkeypatch.setattr(rng, "_use_numpy", lambda keys: False)
    got = rng.uniform(keys, 3001), rng.uniform64(keys, 7), rng.normal(keys, 3001)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    torch.testing.assert_close(ref[2], got[2], rtol=1e-5, atol=1e-5)
    scaled = rng.normal(keys, 3001, scale=torch.arange(5.0))
    torch.testing.assert_close(scaled, got[2] * torch.arange(5.0)[:, None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_generate_through_torch_backend(name, monkeypatch):
    # everything CUDA runs (torch RNG and torch.fft DCT), exercised on CPU
    ref = generate(name, 5, 24, seed=2)
    monkeypatch.setattr(rng, "_use_numpy", lambda keys: False)
    monkeypatch.setattr(recipes, "idct2", idct2_torch)
    torch.testing.assert_close(generate(name, 5, 24, seed=2), ref, rtol=1e-4, atol=1e-4)


def test_idct_matches_scipy():
    x = torch.randn(2, 3, 24, 31)
    ref = scipy.fft.idctn(x.double().numpy(), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(idct2_torch(x.clone()).numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(idct2(x.clone()).numpy(), ref, atol=2e-5)


# --- pink ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_pink_spectrum_slope(alpha):
    x = generate("pink", 64, 64, seed=11, alpha=alpha).double().numpy()
    power = (scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1)) ** 2).mean(axis=(0, 1))
    i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    r = np.hypot(i, j)
    sel = (r >= 2) & (r <= 40)
    slope = np.polyfit(np.log(r[sel]), np.log(power[sel]), 1)[0]
    assert slope == pytest.approx(-2 * alpha, abs=0.15)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_pink_std_per_image_and_channel(sigma):
    x = generate("pink", 8, 48, sigma=sigma, alpha=1.5)
    std = x.double().std(dim=(-2, -1), correction=0)
    torch.testing.assert_close(std, torch.full_like(std, sigma), rtol=1e-4, atol=0)


# --- the other generators -----------------------------------------------------------------------

def test_gradient_range_and_monotone_planes():
    u = unnorm(generate("gradient", 200, 16))
    assert u.min() >= -1e-6 and u.max() <= 1 + 1e-6
    # a, b >= 0: never decreasing along x (width) or y (height)
    assert (u.diff(dim=-1) >= -1e-5).all() and (u.diff(dim=-2) >= -1e-5).all()
    # not all saturated: a real spread of values
    assert u.std() > 0.1 and (u < 0.99).float().mean() > 0.2


def test_constant_is_uniform_per_image_and_channel():
    u = unnorm(generate("constant", 600, 8))
    assert (u.amax(dim=(-2, -1)) - u.amin(dim=(-2, -1))).abs().max() < 1e-6
    values = u[:, :, 0, 0].flatten().numpy()
    assert values.min() >= 0 and values.max() <= 1
    assert scipy.stats.kstest(values, "uniform").pvalue > 1e-3


def test_uniform_unnormalizes_to_u01():
    u = unnorm(generate("uniform", 20, 32)).double()
    assert u.min() > -1e-6 and u.max() < 1 + 1e-6
    assert scipy.stats.kstest(u.flatten().numpy()[::7], "uniform").pvalue > 1e-3


def test_gaussian_is_standard_normal():
    z = generate("gaussian", 20, 32).flatten().numpy()
    assert scipy.stats.kstest(z[::7], "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


def test_modulated_white_is_clipped_mask_times_white_noise():
    n, s, alpha = 12, 32, 1.3
    x = generate("modulated_white", n, s, alpha=alpha)
    ctx, idx = ctx_for(s), torch.arange(n)
    field = recipes.pink(ctx, idx, "modulated_white/field", alpha, 1.0, channels=1).clone()
    assert field.shape == (n, 1, s, s)
    mask = (field * STD + MEAN).clamp(0, 1)  # one field, each channel's mean/std
    white = rng.normal(rng.image_keys(0, "modulated_white/white", idx), 3 * s * s).reshape(n, 3, s, s)
    torch.testing.assert_close(x, mask * white, rtol=1e-5, atol=1e-5)
    assert 0.02 < (mask == 0).float().mean() < 0.5  # the clip is exercised


def test_mixture_weights_are_dirichlet_1_1_2():
    w = recipes.mixture_weights(ctx_for(8), torch.arange(6000), "mixture", (1.0, 1.0, 2.0)).double()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(6000, dtype=torch.float64), atol=1e-6, rtol=0)
    np.testing.assert_allclose(w.mean(0).numpy(), [0.25, 0.25, 0.5], atol=0.015)
    # Var(w_k) = a_k (a0 - a_k) / (a0² (a0 + 1)), a0 = 4
    np.testing.assert_allclose(w.var(0).numpy(), [3 / 80, 3 / 80, 4 / 80], atol=0.006)


def test_dirichlet_tiny_concentration_stays_finite():
    w = recipes.mixture_weights(ctx_for(8), torch.arange(500), "mixture", (1e-3, 1e-3, 1e-3))
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(1), torch.ones(500), atol=1e-6, rtol=0)


def test_mixture_is_weighted_sum_of_components():
    n, s = 10, 32
    x = generate("mixture", n, s, alpha=0.8, sigma=1.5)
    ctx, idx = ctx_for(s), torch.arange(n)
    w = recipes.mixture_weights(ctx, idx, "mixture", (1.0, 1.0, 2.0))[:, :, None, None, None]
    parts = [recipes.modulated_white(ctx, idx, "mixture/modulated_white", 0.8).clone(),
             recipes.pink(ctx, idx, "mixture/pink", 0.8, 1.5).clone(),
             recipes.gradient(ctx, idx, "mixture/gradient").clone()]
    expected = sum(w[:, k] * parts[k] for k in range(3))
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_marginal_categories_follow_weights():
    n, s, weights = 3000, 6, (0.05, 0.15, 0.4, 0.3, 0.1)
    x = generate("marginal", n, s, seed=2)
    ctx, idx = ctx_for(s, seed=2), torch.arange(n)
    # which component produced each image: recompute every component for every index
    found = torch.full((n,), -1)
    for k, name in enumerate(recipes.MARGINAL_CHOICES):
        extra = {"alpha": 1.0, "sigma": 1.0} if name == "pink" else {}
        comp = recipes.COMPONENTS[name](ctx, idx, f"marginal/{name}", **extra).clone()
        match = torch.isclose(x, comp, rtol=1e-5, atol=1e-5).flatten(1).all(1)
        assert not (match & (found >= 0)).any()
        found[match] = k
    assert (found >= 0).all()
    assert torch.equal(found, recipes.marginal_choices(ctx, idx, "marginal", weights))
    counts = np.bincount(found.numpy(), minlength=5)
    assert scipy.stats.chisquare(counts, n * np.array(weights)).pvalue > 1e-3


def test_marginal_custom_weights():
    only_constant = unnorm(generate("marginal", 40, 8, weights=(0, 0, 0, 0, 2)))
    assert (only_constant.amax(dim=(-2, -1)) - only_constant.amin(dim=(-2, -1))).max() < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_tiny_and_odd_sizes(name):
    for size in (1, 2, 5):
        x = generate(name, 3, size)
        assert x.shape == (3, 3, size, size) and torch.isfinite(x).all()


def test_custom_mean_std_and_channels():
    x = generate("constant", 50, 4, mean=(0.5,), std=(0.25,))
    assert x.shape == (50, 1, 4, 4)
    u = x * 0.25 + 0.5
    assert u.min() >= 0 and u.max() <= 1


# --- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: generate("brown", 1, 8), r"'brown'.*valid names: pink, modulated_white"),
    (lambda: generator_params("nope"), r"'nope'.*valid names"),
    (lambda: generate("pink", 1, 8, beta=1), r"'beta'.*'pink'.*valid parameters: alpha, sigma"),
    (lambda: generate("gradient", 1, 8, alpha=1), r"'alpha'.*'gradient'"),
    (lambda: generate("pink", 1, 8, alpha=-0.1), r"'alpha'.*>= 0"),
    (lambda: generate("pink", 1, 8, alpha="x"), r"'alpha'.*number"),
    (lambda: generate("pink", 1, 8, sigma=0), r"'sigma'.*> 0"),
    (lambda: generate("mixture", 1, 8, sigma=-1), r"'sigma'"),
    (lambda: generate("mixture", 1, 8, concentration=(1, -1, 2)), r"'concentration'"),
    (lambda: generate("mixture", 1, 8, concentration=(1, 2)), r"'concentration'.*3 numbers"),
    (lambda: generate("marginal", 1, 8, weights=(0, 0, 0, 0, 0)), r"'weights'.*positive sum"),
    (lambda: generate("marginal", 1, 8, weights=(1, -1, 1, 1, 1)), r"'weights'"),
    (lambda: generate("marginal", 1, 8, weights=(1, 1)), r"'weights'.*5 numbers"),
    (lambda: generate("marginal", 1, 8, weights="abc"), r"'weights'"),
    (lambda: generate("pink", -1, 8), r"count.*>= 0"),
    (lambda: generate("pink", 1, 0), r"size.*>= 1"),
    (lambda: generate("pink", 1, 8.5), r"size.*integer"),
    (lambda: generate("pink", 1, 8, start=-3), r"start.*>= 0"),
    (lambda: generate("pink", 1, 8, seed=-1), r"seed"),
    (lambda: generate("pink", 1, 8, mean=(0.5, 0.5), std=(0.2, 0.2, 0.2)), r"mean and std"),
    (lambda: generate("pink", 1, 8, std=(0.2, 0.0, 0.2)), r"std > 0"),
    (lambda: generate("pink", 1, 8, device="nonsense"), r"device 'nonsense'"),
])
def test_bad_inputs_raise_soap_error(call, match):
    with pytest.raises(SoapError, match=match):
        call()


# --- CLI ----------------------------------------------------------------------------------------

def test_preview_writes_png(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from soapflow.cli.noise import app

    out = tmp_path / "sub" / "grid.png"
    result = CliRunner().invoke(app, ["preview", "--out", str(out), "--size", "32", "--count", "3",
                                      "--names", "pink,gradient,mixture"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.format == "PNG"
        w, h = img.size
        img.load()
    assert w > 200 and h > 200 and h > w * 0.5  # three rows
    bad = CliRunner().invoke(app, ["preview", "--out", str(out), "--names", "pink,foo"])
    assert bad.exit_code != 0 and isinstance(bad.exception, SoapError) and "foo" in str(bad.exception)
    bad = CliRunner().invoke(app, ["preview", "--out", str(out), "--count", "0"])
    assert isinstance(bad.exception, SoapError) and "--count" in str(bad.exception)


# --- CUDA (only where a GPU is present) ---------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name):
    cpu = generate(name, 6, 48, seed=4)
    gpu = generate(name, 6, 48, seed=4, device="cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    assert torch.equal(gpu[2:5], generate(name, 3, 48, seed=4, start=2, device="cuda"))


def test_cpu_pool_works_in_a_forked_child():
    import multiprocessing

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parent = generate("mixture", 9, 16, seed=5)  # starts the pool in this process
        with multiprocessing.get_context("fork").Pool(1) as pool:
            child = pool.apply_async(_generate_two_threads, (9, 16, 5)).get(timeout=120)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(parent, child)


def _generate_two_threads(count, size, seed):
    torch.set_num_threads(2)
    return generate("mixture", count, size, seed=seed)
