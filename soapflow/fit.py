"""The exact, out-of-core SOAP fit of two feature stores on a dask cluster.

Two passes over the real store and one over the synthetic store, block by block:
1. float64 moments per block, merged with Chan's formula in a fixed binary tree;
2. activation counts per block against the real mean and components, summed.
Blocks are a fixed number of images that depends only on the token shape, never on the
stores' chunking or the number of workers, and the merge tree is fixed too — so the
artifact is bit-identical however the data were chunked or the work was spread.
Memory is a few blocks per worker thread, independent of N.

Leaves run where the fit's ``device`` says: NumPy on CPU, or torch on a CUDA device of each
worker (``soapflow.fit_device``); merges, the eigendecomposition and the artifact are the same
host code either way. The local cluster stays a plain ``LocalCluster`` whose threads share
the GPU, rather than dask-cuda's ``LocalCUDACluster``: one process keeps the blocks' partial
sums out of inter-process transfers, needs no extra dependency, and a machine with several
GPUs can still run a dask-cuda cluster and pass its address (``cuda`` is then each worker's GPU).
"""

from __future__ import annotations

import glob
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from soapflow import method
from soapflow.config import FitParams
from soapflow.errors import SoapError
from soapflow.storage.feature_store import FeatureStore, check_compatible, final_norm_of

# Images per block = this many bytes of float16 tokens (≈ 4× that once in float64): large
# enough for efficient GEMMs, small enough for a few blocks in flight per core.
BLOCK_BYTES = 32 * 2**20


# What one task thread holds at its peak: the block, its float64 (moments) or float32 copy and
# projections (counts), zarr's chunk buffers, and its malloc arena's slack (measured by
# tests/test_fit_scale.py). A local cluster runs as many threads as fit this in memory.
LEAF_BYTES = 8 * BLOCK_BYTES

DEVICES = "auto, cpu, cuda or cuda:N"


def block_images(grid: tuple[int, int], dim: int) -> int:
    h, w = grid
    return max(1, BLOCK_BYTES // (h * w * dim * 2))


@dataclass
class _Partial:
    """A leaf or merged result; ``bad`` is the first image index holding NaN/Inf, if any."""

    value: object
    bad: int | None = None


def _first_bad(block: np.ndarray, start: int) -> int | None:
    finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
    return None if finite.all() else start + int(np.argmin(finite))


def _min_bad(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _read(tokens, start: int, stop: int) -> np.ndarray:
    return np.asarray(tokens[start:stop])


def _leaf_moments(tokens, start: int, stop: int, device: str = "cpu") -> _Partial:
    if device != "cpu":
        from soapflow import fit_device

        value, bad = fit_device.leaf_moments(tokens, start, stop, device)
        if bad is not None:
            d = tokens.shape[-1]
            return _Partial(method.Moments(0, np.zeros(d), np.zeros((d, d))), bad)
        return _Partial(value)
    block = _read(tokens, start, stop)
    bad = _first_bad(block, start)
    if bad is not None:
        d = block.shape[-1]
        return _Partial(method.Moments(0, np.zeros(d), np.zeros((d, d))), bad)
    return _Partial(method.moments(block))


def _merge_moments(a: _Partial, b: _Partial) -> _Partial:
    return _Partial(method.merge_moments(a.value, b.value), _min_bad(a.bad, b.bad))


def _leaf_counts(tokens, start: int, stop: int, mean: np.ndarray, components: np.ndarray,
                 checked: bool = False, device: str = "cpu") -> _Partial:
    if device != "cpu":
        from soapflow import fit_device

        value, bad = fit_device.leaf_counts(tokens, start, stop, mean, components, device, checked)
        if bad is not None:
            return _Partial(np.zeros((*tokens.shape[1:3], components.shape[0]), np.int64), bad)
        return _Partial(value)
    block = _read(tokens, start, stop)
    bad = None if checked else _first_bad(block, start)  # checked: the moments pass read it already
    if bad is not None:
        return _Partial(np.zeros((*block.shape[1:3], components.shape[0]), np.int64), bad)
    return _Partial(method.activation_counts(block, mean, components))


def _merge_counts(a: _Partial, b: _Partial) -> _Partial:
    return _Partial(a.value + b.value, _min_bad(a.bad, b.bad))


def _blocks(store: FeatureStore) -> list[tuple[int, int]]:
    """Image ranges of ``block_images`` each: fixed by the token shape, not the chunking.

    Each task reads its range straight from zarr (which decodes just the chunks it
    touches); a dask-array rechunk to these ranges costs about as much as the arithmetic.
    """
    n, h, w, d = store.shape
    b = block_images((h, w), d)
    return [(start, min(n, start + b)) for start in range(0, n, b)]


def _tree_reduce(client, futures: list, merge):
    """Pairwise merge in index order: the same tree for the same number of leaves."""
    while len(futures) > 1:
        merged = [client.submit(merge, futures[i], futures[i + 1], pure=False) for i in range(0, len(futures) - 1, 2)]
        if len(futures) % 2:
            merged.append(futures[-1])
        futures = merged
    return futures[0]


def _submit_pass(client, store: FeatureStore, leaf, merge, extra_args=()):
    """Leaves and merge tree of one pass over ``store``: (root future, leaf futures)."""
    import dask

    # one graph key for the array handle (an explicit name: tokenizing a zarr array reads it)
    tokens = dask.delayed(store.tokens, name=f"tokens-{uuid.uuid4().hex}")
    shared = [dask.delayed(a, pure=True) for a in extra_args]
    leaves = client.compute([dask.delayed(leaf, pure=True)(tokens, a, b, *shared) for a, b in _blocks(store)])
    return _tree_reduce(client, list(leaves), merge), leaves


@dataclass
class PassStats:
    """One pass of a fit (it may read several stores at once): for benchmarks and logs."""

    name: str
    seconds: float
    bytes_read: int
    blocks: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds > 0 else float("inf")


def _run_passes(client, passes: list[tuple], desc: str, progress: bool, stats: list | None = None) -> list[_Partial]:
    """Run passes ``(store, leaf, merge, extra_args)`` at once (their blocks share the workers)."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    submitted = [_submit_pass(client, store, leaf, merge, extra) for store, leaf, merge, extra in passes]
    pending = as_completed([f for _, leaves in submitted for f in leaves])
    roots = [root for root, _ in submitted]
    del submitted  # only the merge trees should keep leaf results alive
    for _ in tqdm(pending, total=pending.count(), desc=desc, unit="block", disable=not progress, leave=False):
        pass
    results = []
    for (store, *_), root in zip(passes, roots):
        result = root.result()
        if result.bad is not None:
            c = result.bad // store.chunk
            rows = store.chunk_range(c)
            raise SoapError(
                f"feature store {store.uri}: NaN/Inf tokens in chunk {c} (images {rows.start}–{rows.stop - 1}), "
                f"first at image {result.bad}"
            )
        results.append(result)
    if stats is not None:
        stats.append(PassStats(desc.removeprefix("fit: "), time.perf_counter() - t0,
                               sum(store.tokens.nbytes for store, *_ in passes),
                               sum(len(_blocks(store)) for store, *_ in passes)))
    return results


def check_device(device: str | None) -> str:
    """``device`` as the fit uses it: auto, cpu, cuda or cuda:N (``torch-cpu``: the CUDA code on CPU)."""
    device = "auto" if device is None else str(device).strip().lower()
    if device in ("auto", "cpu", "torch-cpu", "cuda"):
        return device
    if device.startswith("cuda:") and device[5:].isdigit():
        return device
    raise SoapError(f"--device must be {DEVICES}, got {device!r}")


def _cuda_devices(probe: bool) -> int:
    """CUDA devices this process sees; ``probe=False`` skips importing torch where no NVIDIA device node exists."""
    if not probe and "torch" not in sys.modules and not glob.glob("/dev/nvidia[0-9]*"):
        return 0  # importing torch only to learn that would add seconds to every CPU fit
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(client, device: str | None) -> str:
    """The device every leaf runs on: one for the whole fit, so its artifact does not depend on
    which worker took which block. ``auto``: CUDA where every worker has it, else CPU."""
    device = check_device(device)
    if device in ("cpu", "torch-cpu"):
        return device
    counts = client.run(_cuda_devices, device != "auto")
    if device == "auto":
        return "cuda" if counts and min(counts.values()) > 0 else "cpu"
    index = int(device.partition(":")[2] or 0)
    short = sorted(addr for addr, n in counts.items() if n <= index)
    if short or not counts:
        where = "this machine" if len(counts) <= 1 else f"dask worker(s) {', '.join(short)}"
        raise SoapError(f"--device {device}: no such CUDA device on {where}")
    return device


def open_fit_inputs(real_uri: str, synth_uri: str, storage_options: dict | None = None
                    ) -> tuple[FeatureStore, FeatureStore]:
    """Every check a fit can make before it reads a token (``FitParams`` checked its parameters):
    both stores, compatibility."""
    real = FeatureStore.open(real_uri, storage_options)
    synth = FeatureStore.open(synth_uri, storage_options)
    check_compatible(real, synth)
    real.require_complete()
    synth.require_complete()
    h, w = real.grid
    if real.count * h * w < 2:
        raise SoapError(f"feature store {real.uri}: need at least 2 tokens for a covariance")
    return real, synth


@dataclass
class FitInputs:
    """What a fit read, for the manifest."""

    real: FeatureStore
    synth: FeatureStore
    n_real_images: int
    n_real_tokens: int
    n_synth_images: int
    n_synth_tokens: int
    device: str = "cpu"
    passes: list[PassStats] = field(default_factory=list)


def fit_stores(real_uri: str, synth_uri: str, params: FitParams = FitParams(), *, client,
               storage_options: dict | None = None, progress: bool = True,
               device: str | None = None) -> tuple[method.SoapFit, FitInputs]:
    """Fit SOAP on a real and a synthetic feature store (SPEC §1), out of core, on ``client``.

    ``device``: where the leaves compute (``check_device``); ``None`` is ``auto``.
    """
    check_device(device)
    real, synth = open_fit_inputs(real_uri, synth_uri, storage_options)
    return _fit_checked(client, real, synth, params, progress, device)


def _fit_checked(client, real: FeatureStore, synth: FeatureStore, params: FitParams,
                 progress: bool, device: str | None = None) -> tuple[method.SoapFit, FitInputs]:
    """The fit proper, on stores that ``open_fit_inputs`` has opened and checked."""
    h, w = real.grid
    device = resolve_device(client, device)
    stats: list[PassStats] = []
    moments = _run_passes(client, [(real, _leaf_moments, _merge_moments, (device,))], "fit: moments", progress,
                          stats)[0].value
    from threadpoolctl import threadpool_limits

    # LAPACK's eigenvectors change in the last bit with its thread count (dask workers
    # default to one BLAS thread): one thread everywhere keeps artifacts bit-identical.
    with threadpool_limits(limits=1):
        eigenvalues, components = method.principal_components(moments)
    # pass 1 checked the real store's tokens are finite; the synthetic store is read only here
    real_counts, synth_counts = (r.value for r in _run_passes(client, [
        (real, _leaf_counts, _merge_counts, (moments.mean, components, True, device)),
        (synth, _leaf_counts, _merge_counts, (moments.mean, components, False, device)),
    ], "fit: response maps", progress, stats))
    try:
        fit = method.soap_from_statistics(moments, components, eigenvalues, real_counts, real.count, synth_counts,
                                          synth.count, params)
    except ValueError as exc:
        raise SoapError(str(exc)) from None
    inputs = FitInputs(real, synth, real.count, real.count * h * w, synth.count, synth.count * h * w, device, stats)
    return fit, inputs


def fit_manifest(fit: method.SoapFit, inputs: FitInputs, params: FitParams) -> dict:
    """Manifest fields of SPEC §4 that a fit knows (the registry adds name and version)."""
    from soapflow import __version__
    from soapflow.common import utc_now

    attrs = inputs.real.attrs
    return {
        "name": None,
        "version": None,
        "backbone": attrs.get("backbone"),
        "weights": attrs.get("weights"),
        "layer": attrs.get("layer"),
        "feature": attrs.get("feature", "out"),
        "final_norm": final_norm_of(attrs),
        "image_size": attrs.get("image_size"),
        "grid": list(inputs.real.grid),
        "dim": inputs.real.dim,
        "mu": fit.mu,
        "mu_mode": "auto" if params.auto else "fixed",
        "tau": fit.tau,
        "gamma": fit.gamma,
        "threshold": fit.threshold,
        "suppress": fit.suppress,
        "n_suppressed": int(np.count_nonzero(method.suppressed(fit.weights, fit.scores))),
        "n_real_images": inputs.n_real_images,
        "n_real_tokens": inputs.n_real_tokens,
        "n_synth_images": inputs.n_synth_images,
        "n_synth_tokens": inputs.n_synth_tokens,
        "stores": {"real": inputs.real.describe(), "synthetic": inputs.synth.describe()},
        "soapflow_version": __version__,
        "created": utc_now(),
        "evaluation": {},
    }


def fit_warnings(fit: method.SoapFit, manifest: dict) -> list[str]:
    """What a person should know about a fit that ran: too few images for stable SI scores, and a
    fixed μ that suppresses components the SI scores call semantic."""
    from soapflow.defaults import FEW_IMAGES

    out = []
    few = [(what, n) for what, n in (("real", manifest.get("n_real_images")),
                                     ("synthetic", manifest.get("n_synth_images"))) if n is not None and n < FEW_IMAGES]
    if few:
        counts = " and ".join(f"{n} {what}" for what, n in few)
        out.append(f"fit on only {counts} images: SI scores from so few images are mostly noise; "
                   f"use at least {FEW_IMAGES} (hundreds are better)")
    suppressed = method.suppressed(fit.weights, fit.scores)
    low = np.flatnonzero(suppressed & (fit.scores < fit.threshold))
    if manifest.get("mu_mode") == "fixed" and fit.suppress is None and len(low):
        ranks = ", ".join(f"rank {int(r)} (SI {fit.scores[r]:.3f})" for r in low[:5])
        above = int(np.count_nonzero(fit.scores > fit.threshold))
        out.append(f"μ = {fit.mu:g} suppresses {len(low)} component(s) with SI below the threshold "
                   f"{fit.threshold:g}: {ranks}; they may carry semantics. --mu auto suppresses only those above "
                   f"it (here {above or 'none'})")
    return out


def fit_to_artifact(real_uri: str, synth_uri: str, out_dir: str, params: FitParams = FitParams(), *,
                    cluster=None, workers: int = 1, device: str | None = None, storage_options: dict | None = None,
                    overwrite: bool = False, plots: bool = True, progress: bool = True,
                    extra_manifest: dict | None = None):
    """Fit two stores and write the artifact (with plots); return ``(path, fit, manifest)``.

    ``cluster``: a ``distributed.Client`` (several fits sharing one cluster), a scheduler
    address, or None for a local cluster of ``workers`` workers (``soapflow.cluster``).
    ``device``: auto (default: CUDA if the workers have it), cpu, cuda or cuda:N.
    """
    import contextlib

    from soapflow.cluster import dask_client
    from soapflow.storage.artifact import check_artifact_target, fit_tensors, read_manifest, write_artifact

    # fail on bad input before starting a cluster or reading a token
    check_device(device)
    real, synth = open_fit_inputs(real_uri, synth_uri, storage_options)
    check_artifact_target(out_dir, overwrite)
    if cluster is None or isinstance(cluster, str):
        running = dask_client(cluster, workers=workers, processes=workers > 1, thread_bytes=LEAF_BYTES)
    else:
        running = contextlib.nullcontext(cluster)
    with running as client:
        fit, inputs = _fit_checked(client, real, synth, params, progress, device)
    manifest = {**fit_manifest(fit, inputs, params), **(extra_manifest or {})}
    extra_files = {}
    if plots:
        from soapflow import plots as soap_plots

        extra_files = soap_plots.fit_plots(fit, manifest)
    path = write_artifact(out_dir, fit_tensors(fit), manifest, overwrite=overwrite, extra_files=extra_files)
    return path, fit, read_manifest(path)
