"""Planted-artifact benchmark: does the pipeline find and remove what is really there?

A controlled experiment on real tokens (issue 15 §2):

1. **Extract** clean feature stores the normal way (:func:`soapflow.extract.extract`): real
   images for the fit, synthetic ones, and the evaluation images.
2. **Plant** ``k`` positional artifacts into every token, real and synthetic alike:
   ``z(h, w) += Σ_j c_j · a_j(h, w) · u_j`` with ``a_j`` a low-frequency 2-D cosine (a DCT-II
   basis function of the grid, zero mean and unit RMS over the positions, so the patterns are
   mutually orthogonal) and ``u_j`` orthonormal random directions. Such a term is the same for
   every image: non-semantic by construction. The variance it adds along ``u_j`` over all tokens
   is ``c_j²``; the *amplitude* sets it to a multiple of the largest eigenvalue of the clean real
   tokens, ``c_j² = amplitude · λ_max``. Planted tokens go into new zarr feature stores.
3. **Fit** the planted stores with the normal dask fit (``fit_to_artifact`` on a LocalCluster),
   μ = auto by default, into an artifact; the clean stores are fitted the same way.
4. **Measure**
   * recovery: principal angles between the suppressed subspace (the components the registry
     counts as suppressed, :func:`soapflow.method.suppressed`) and ``span(u_j)``, and each
     ``u_j``'s angle to that subspace;
   * suppressed components that are not planted (less than half their norm² in ``span(u_j)``);
   * the SI of each planted direction, two ways: ``si`` — SPEC §1 steps 3–5 with ``u_j`` itself
     in place of a component (activation ``1[(z − m)·u_j > 0]`` against the fit's real mean), a
     basis-free number; and the score of the component best aligned with ``u_j`` (largest
     ``|v_d·u_j|``), with that ``|cos|``, its rank and its weight;
   * zero-shot results on clean, clean + SOAP, planted and planted + SOAP tokens (each SOAP head
     loaded from its artifact with :class:`soapflow.SOAPHead` and applied to the tokens): TokenCut
     max Fβ, patch kNN mIoU and kNN top-1 (mean-pooled), with paired bootstrap CIs
     (:mod:`soapflow.evaluation.stats`), how much of the loss planting caused SOAP recovers, and
     whether planted + SOAP is within the CI of clean + SOAP.

The kNN bank is the real fit store (the training split), so the real data must carry labels
(fashion-mnist) for the kNN evaluations.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from soapflow import method
from soapflow.common import utc_now
from soapflow.config import EVALUATIONS, BackboneSpec, EvalSettings, FitParams
from soapflow.errors import SoapError

__all__ = [
    "MAX_ANGLE_DEG",
    "EVALUATIONS",
    "Planting",
    "PlantedData",
    "Plant",
    "cosine_patterns",
    "planted_directions",
    "make_plant",
    "quiet_order",
    "PLANT_CHOICES",
    "recovery",
    "plant_store",
    "direction_scores",
    "fit_sweep",
    "run_planted",
    "markdown_table",
    "print_report",
    "plot_report",
]

#: A planted direction counts as recovered when the largest principal angle is at most this.
MAX_ANGLE_DEG = 10.0
METRICS = {  # evaluation -> (report key, label)
    "salient": ("tokencut_max_fbeta", "TokenCut max Fβ"),
    "knn-seg": ("knn_seg_miou", "patch kNN mIoU"),
    "knn-cls": ("knn_top1", "kNN top-1 (mean-pooled)"),
}


# ------------------------------------------------------------------------------ settings


def _tuple(values, kind, what):
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise SoapError(f"{what}: expected a list of numbers, got {values!r}") from None
    if not out:
        raise SoapError(f"{what}: give at least one value")
    return out


@dataclass(frozen=True)
class Planting:
    """What is planted and how it is fitted: the sweep ``ks × amplitudes``."""

    ks: tuple[int, ...] = (1, 2, 4)
    amplitudes: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    seed: int = 0
    mu: float | str = "auto"
    tau: float = 0.05
    threshold: float = 0.75
    plant: str = "quiet"  # where to plant: see PLANT_CHOICES

    def __post_init__(self):
        if self.plant not in PLANT_CHOICES:
            raise SoapError(f"--plant must be one of {', '.join(PLANT_CHOICES)}, got {self.plant!r}")
        object.__setattr__(self, "ks", _tuple(self.ks, int, "--k"))
        object.__setattr__(self, "amplitudes", _tuple(self.amplitudes, float, "--amplitudes"))
        bad = [k for k in self.ks if not 1 <= k <= len(_FREQUENCIES)]
        if bad:
            raise SoapError(f"--k: each k must be 1…{len(_FREQUENCIES)}, got {list(bad)}")
        bad = [a for a in self.amplitudes if not (a > 0 and np.isfinite(a))]
        if bad:
            raise SoapError(f"--amplitudes must be > 0, got {list(bad)}")
        if not 0 < self.threshold < 1:
            raise SoapError(f"--threshold must be in (0, 1), got {self.threshold}")
        self.fit_params  # checks μ and τ

    @property
    def fit_params(self) -> FitParams:
        return FitParams.parse(self.mu, tau=self.tau, threshold=self.threshold)


@dataclass(frozen=True)
class PlantedData:
    """Backbone and images: the clean stores are extracted from these."""

    backbone: str = "dinov2_vits14"
    weights: str | None = None
    layer: int = -1
    final_norm: str = "auto"
    image_size: int | None = None
    real: str = "fashion-mnist:train"
    n_real: int = 300
    synth: str = "noise:mixture"
    n_synth: int = 300
    eval_data: str = "fashion-mnist:test"
    n_eval: int = 300
    chunk: int = 32
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        from soapflow.backbones import parse_final_norm

        object.__setattr__(self, "final_norm", parse_final_norm(self.final_norm))
        for name in ("n_real", "n_synth", "n_eval"):
            if getattr(self, name) < 2:
                raise SoapError(f"--{name.replace('_', '-')} must be ≥ 2, got {getattr(self, name)}")
        if self.chunk < 1:
            raise SoapError(f"--chunk must be ≥ 1, got {self.chunk}")


# ------------------------------------------------------------------------------ planting

# Low-frequency DCT-II index pairs (f_y, f_x), lowest total frequency first, (0, 0) excluded.
_FREQUENCIES = tuple(sorted(((fy, fx) for fy in range(4) for fx in range(4) if fy + fx and fy + fx <= 3),
                            key=lambda f: (f[0] + f[1], f[0])))


# "quiet": where the clean tokens are quiet, so that u_j is the ground truth — the patterns the
# clean per-position mean varies least along (else the artifact present is c_j·u_j + g_j) and
# directions orthogonal to the clean principal components with eigenvalue ≥ QUIET_EIGENVALUE·λ_max
# (else PCA tilts u_j toward them). "plain": the lowest frequencies and any random directions.
PLANT_CHOICES = ("quiet", "plain")
QUIET_EIGENVALUE = 0.05


def cosine_patterns(grid: tuple[int, int], k: int, order=None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``k`` smooth positional patterns ``(k, H, W)`` and their frequencies ``(f_y, f_x)``.

    ``a(h, w) = cos(π f_y (h + ½)/H) · cos(π f_x (w + ½)/W)``, scaled to unit RMS. DCT-II basis
    functions: each sums to zero over the grid and any two are orthogonal. ``order``: the
    frequencies to take the first ``k`` from (default: lowest total frequency first)."""
    h, w = grid
    freqs = [tuple(f) for f in (order or _FREQUENCIES) if f[0] < h and f[1] < w][:k]
    if len(freqs) < k:
        raise SoapError(f"a {h}×{w} grid has only {len(freqs)} of the low-frequency patterns, need k={k}")
    y = (np.arange(h) + 0.5) / h
    x = (np.arange(w) + 0.5) / w
    pats = np.stack([np.outer(np.cos(np.pi * fy * y), np.cos(np.pi * fx * x)) for fy, fx in freqs])
    pats /= np.sqrt((pats**2).mean(axis=(1, 2)))[:, None, None]
    return pats, freqs


def planted_directions(dim: int, k: int, seed: int = 0, avoid: np.ndarray | None = None) -> np.ndarray:
    """``k`` orthonormal random unit directions ``(k, D)``, orthogonal to the orthonormal rows of
    ``avoid`` if given; the first ``j`` are the same for every ``k ≥ j``."""
    free = dim - (0 if avoid is None else len(avoid))
    if k > free:
        raise SoapError(f"cannot plant {k} orthonormal directions in D={dim}" + ("" if avoid is None else
                        f" orthogonal to {len(avoid)} natural components"))
    g = np.random.default_rng(seed).standard_normal((k, dim))
    if avoid is not None and len(avoid):
        g -= (g @ avoid.T) @ avoid
    q, r = np.linalg.qr(g.T)
    return np.ascontiguousarray((q * np.sign(np.diag(r))).T)


@dataclass(frozen=True, eq=False)
class Plant:
    """``Σ_j c_j a_j(h, w) u_j``, added to every token."""

    patterns: np.ndarray  # (k, H, W) zero mean, unit RMS
    frequencies: list
    directions: np.ndarray  # (k, D) orthonormal
    coefficients: np.ndarray  # (k,)
    amplitude: float
    lambda_max: float
    seed: int

    @property
    def k(self) -> int:
        return len(self.directions)

    def field(self) -> np.ndarray:
        """The planted term ``(H, W, D)`` float32."""
        return np.einsum("k,khw,kd->hwd", self.coefficients, self.patterns, self.directions).astype(np.float32)

    def describe(self) -> dict:
        d = self.directions
        return {
            "k": self.k,
            "amplitude": self.amplitude,
            "lambda_max": self.lambda_max,
            "coefficients": [float(c) for c in self.coefficients],
            "added_variance": [float(c) ** 2 for c in self.coefficients],
            "frequencies": [list(f) for f in self.frequencies],
            "seed": self.seed,
            "directions_sha256": hashlib.sha256(np.ascontiguousarray(d, dtype=np.float64).tobytes()).hexdigest(),
        }


def quiet_order(position_mean: np.ndarray) -> list[tuple[int, int]]:
    """The low-frequency patterns ordered by ``‖g_j‖`` (:func:`natural_pattern_components`) in a
    store's per-position mean ``(H, W, D)``, quietest first."""
    pats, freqs = cosine_patterns(position_mean.shape[:2], len(_FREQUENCIES))
    g = np.linalg.norm(natural_pattern_components(position_mean, pats), axis=1)
    return [freqs[i] for i in np.argsort(g, kind="stable")]


def make_plant(grid: tuple[int, int], dim: int, k: int, amplitude: float, lambda_max: float, seed: int = 0,
               order=None, avoid: np.ndarray | None = None) -> Plant:
    """The plant whose every direction adds ``amplitude · lambda_max`` of variance over all tokens;
    its patterns are the first ``k`` of ``order`` (see :func:`cosine_patterns`), its directions
    orthogonal to ``avoid`` (see :func:`planted_directions`)."""
    patterns, freqs = cosine_patterns(grid, k, order)
    coef = np.full(k, np.sqrt(amplitude * lambda_max))
    return Plant(patterns, freqs, planted_directions(dim, k, seed, avoid), coef, float(amplitude), float(lambda_max),
                 seed)


# ------------------------------------------------------------------------------ analysis


def _angles(s: np.ndarray, v: np.ndarray) -> list[float]:
    """Principal angles (°, ascending) between ``span(rows of s)`` and the ``k``-dimensional
    ``span(rows of v)``; 90° for each planted dimension the suppressed subspace cannot hold."""
    from scipy.linalg import subspace_angles

    angles = sorted(float(a) for a in np.degrees(subspace_angles(s.T, v.T))) if len(s) else []
    return angles + [90.0] * (len(v) - len(angles))


def recovery(tensors: dict, directions: np.ndarray, effective: np.ndarray | None = None) -> dict:
    """How well an artifact's suppressed subspace matches ``span(directions)``.

    ``tensors``: an artifact's (``components`` rows in rank order, ``scores``, ``weights``, …).
    ``effective`` (``(k, D)``, optional): the positional artifact actually present with each
    planted pattern, ``c_j u_j + g_j`` (see :func:`natural_pattern_components`); its principal
    angles are reported beside those to ``span(u_j)``."""
    comps = np.asarray(tensors["components"], dtype=np.float64)
    scores = np.asarray(tensors["scores"], dtype=np.float64)
    weights = np.asarray(tensors["weights"], dtype=np.float64)
    u = np.asarray(directions, dtype=np.float64)
    k = len(u)
    rows = np.flatnonzero(method.suppressed(weights, scores))
    s = comps[rows]
    angles = _angles(s, u)
    per_dir = np.degrees(np.arccos(np.clip(np.linalg.norm(s @ u.T, axis=0), 0, 1))) if len(rows) else np.full(k, 90.0)
    in_span = (comps[rows] @ u.T) ** 2  # (s, k): share of each suppressed component in each u_j
    planted_like = in_span.sum(axis=1) >= 0.5
    directions_out = []
    for j in range(k):
        cos = np.abs(comps @ u[j])
        d = int(np.argmax(cos))
        directions_out.append({
            "j": j,
            "angle_to_suppressed_deg": float(per_dir[j]),
            "best_rank": d,
            "best_abs_cos": float(cos[d]),
            "best_score": float(scores[d]),
            "best_weight": float(weights[d]),
            "best_eigenvalue": float(tensors["eigenvalues"][d]) if "eigenvalues" in tensors else None,
            "best_suppressed": bool(d in set(rows.tolist())),
        })
    extra = {}
    if effective is not None:
        eff = np.asarray(effective, dtype=np.float64)
        ea = _angles(s, eff)
        extra = {"effective_principal_angles_deg": ea, "effective_max_angle_deg": float(max(ea))}
        for j, d in enumerate(directions_out):
            d["angle_u_to_effective_deg"] = float(np.degrees(np.arccos(np.clip(
                abs(eff[j] @ u[j]) / max(np.linalg.norm(eff[j]), 1e-300), 0, 1))))
    return {
        "suppressed_ranks": [int(r) for r in rows],
        "n_suppressed": int(len(rows)),
        "principal_angles_deg": angles,
        "max_angle_deg": float(max(angles)),
        "recovered": bool(max(angles) <= MAX_ANGLE_DEG),
        "n_suppressed_not_planted": int(np.count_nonzero(~planted_like)),
        "directions": directions_out,
        **extra,
    }


def natural_pattern_components(position_mean: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """``g_j = mean over positions of a_j(h, w)·(μ(h, w) − m)`` ``(k, D)``: how the clean tokens'
    own per-position mean already varies with each planted pattern. Planting adds ``c_j u_j``
    to it, so the positional artifact with pattern ``a_j`` in the planted tokens is
    ``c_j u_j + g_j`` (patterns have unit RMS), and PCA finds that, not ``u_j`` alone."""
    mu = np.asarray(position_mean, dtype=np.float64)
    centred = mu - mu.mean(axis=(0, 1))
    return np.einsum("khw,hwd->kd", patterns, centred) / (mu.shape[0] * mu.shape[1])


def _position_mean(store) -> np.ndarray:
    """Per-position mean ``(H, W, D)`` over a store's images, in float64."""
    from soapflow.fit import block_images

    n = store.count
    b = block_images(store.grid, store.dim)
    total = np.zeros((*store.grid, store.dim))
    for start in range(0, n, b):
        total += np.asarray(store.tokens[start:min(n, start + b)]).sum(axis=0, dtype=np.float64)
    return total / n


def direction_scores(real_counts: np.ndarray, n_real: int, synth_counts: np.ndarray, n_synth: int,
                     gamma: float = 1.0) -> np.ndarray:
    """SI (SPEC §1 step 5) of arbitrary directions from their activation counts ``(H, W, k)``."""
    return method.si_scores(method.response_map(real_counts, n_real), method.response_map(synth_counts, n_synth), gamma)


def _store_counts(store, mean: np.ndarray, directions: np.ndarray) -> np.ndarray:
    from soapflow.fit import block_images

    n = store.count
    b = block_images(store.grid, store.dim)
    return sum(method.activation_counts(np.asarray(store.tokens[s:min(n, s + b)]), mean, directions)
               for s in range(0, n, b))


# ------------------------------------------------------------------------------ stores

_SKIP_ATTRS = {"soapflow_store", "grid", "dim", "count", "created", "completed", "dtype"}


def plant_store(clean_uri: str, out_uri: str, plant: Plant | None, *, progress: bool = False):
    """A new feature store at ``out_uri``: the clean store's tokens plus ``plant``'s field,
    chunk for chunk, with the clean store's attributes and a ``planted`` record."""
    from tqdm.auto import tqdm

    from soapflow.storage.feature_store import FeatureStore

    clean = FeatureStore.open(clean_uri)
    clean.require_complete()
    attrs = {k: v for k, v in clean.attrs.items() if k not in _SKIP_ATTRS}
    desc = plant.describe()
    attrs["planted"] = {**desc, "clean_store": clean.uri}
    base_fp = str(attrs.get("fingerprint", clean.uri))
    attrs["fingerprint"] = hashlib.sha256(json.dumps([base_fp, desc], sort_keys=True).encode()).hexdigest()
    out = FeatureStore.create(out_uri, count=clean.count, grid=clean.grid, dim=clean.dim, chunk=clean.chunk,
                              dtype=str(clean.tokens.dtype), attrs=attrs)
    add = plant.field()
    for c in tqdm(out.pending_chunks(), desc=f"plant {os.path.basename(out_uri)}", unit="chunk",
                  disable=not progress, leave=False):
        rows = out.chunk_range(c)
        out.write_chunk(c, np.asarray(clean.tokens[rows.start:rows.stop], dtype=np.float32) + add)
    out.finalize(count=out.count)
    return out


# ------------------------------------------------------------------------------ fits


def _fit(real_uri, synth_uri, out_dir, planting: Planting, address, extra, progress):
    from soapflow.fit import fit_to_artifact

    path, _, manifest = fit_to_artifact(real_uri, synth_uri, out_dir, planting.fit_params, cluster=address,
                                        overwrite=True, plots=False, progress=progress, extra_manifest=extra)
    return str(path), manifest


def _top_scores(tensors, n=6):
    s = np.asarray(tensors["scores"])
    order = np.argsort(-s, kind="stable")[:n]
    return [{"rank": int(r), "score": float(s[r])} for r in order]


def fit_sweep(real_uri: str, synth_uri: str, planting: Planting, work_dir: str, *, keep_stores: bool = False,
              progress: bool = True) -> dict:
    """Fit the clean stores, then for every ``(k, amplitude)`` plant, write the planted stores,
    fit them, and measure recovery and the planted directions' SI. One LocalCluster serves
    every fit. Returns ``{"clean": {...}, "runs": [...]}`` (artifact paths included)."""
    from tqdm.auto import tqdm

    from soapflow.cluster import dask_client
    from soapflow.storage.artifact import read_artifact
    from soapflow.storage.feature_store import FeatureStore

    real = FeatureStore.open(real_uri)
    synth = FeatureStore.open(synth_uri)
    os.makedirs(work_dir, exist_ok=True)
    configs = [(k, a) for k in planting.ks for a in planting.amplitudes]
    runs = []
    with dask_client() as client:
        address = client.scheduler.address
        clean_path, clean_manifest = _fit(real_uri, synth_uri, os.path.join(work_dir, "artifacts", "clean"), planting,
                                          address, {"planted": None}, progress)
        clean_t = read_artifact(clean_path).tensors
        lam = float(clean_t["eigenvalues"][0])
        position_mean = _position_mean(real)
        quiet = planting.plant == "quiet"
        order = quiet_order(position_mean) if quiet else None
        ev_clean = np.asarray(clean_t["eigenvalues"], dtype=np.float64)
        avoid = np.asarray(clean_t["components"], dtype=np.float64)[ev_clean >= QUIET_EIGENVALUE * lam] if quiet else None
        clean = {
            "artifact": clean_path,
            "lambda_max": lam,
            "eigenvalues_top": [float(v) for v in clean_t["eigenvalues"][:8]],
            "mu": clean_manifest["mu"],
            "n_suppressed": clean_manifest["n_suppressed"],
            "top_si": _top_scores(clean_t),
            # how many natural components the planted directions are kept orthogonal to (quiet only)
            "n_avoided": None if avoid is None else len(avoid),
        }
        for k, amp in tqdm(configs, desc="planted fits", unit="fit", disable=not progress, leave=False):
            t0 = time.perf_counter()
            plant = make_plant(real.grid, real.dim, k, amp, lam, planting.seed, order, avoid)
            tag = f"k{k}-a{amp:g}"
            stores = os.path.join(work_dir, "stores", tag)
            pr = plant_store(real_uri, os.path.join(stores, "real"), plant, progress=progress)
            ps = plant_store(synth_uri, os.path.join(stores, "synthetic"), plant, progress=progress)
            path, manifest = _fit(pr.uri, ps.uri, os.path.join(work_dir, "artifacts", tag), planting, address,
                                  {"planted": plant.describe()}, progress)
            tensors = read_artifact(path).tensors
            natural = natural_pattern_components(position_mean, plant.patterns)
            rec = recovery(tensors, plant.directions, plant.coefficients[:, None] * plant.directions + natural)
            for d, g, c in zip(rec["directions"], natural, plant.coefficients):
                d["natural_ratio"] = float(np.linalg.norm(g) / c)  # ‖g_j‖ / c_j
            mean = np.asarray(tensors["mean"], dtype=np.float64)
            si = direction_scores(_store_counts(pr, mean, plant.directions), pr.count,
                                  _store_counts(ps, mean, plant.directions), ps.count, manifest.get("gamma", 1.0))
            for d, s in zip(rec["directions"], si):
                d["si"] = float(s)
                d["frequency"] = list(plant.frequencies[d["j"]])
            if not keep_stores:
                shutil.rmtree(stores, ignore_errors=True)
            runs.append({
                "k": k,
                "amplitude": amp,
                "tag": tag,
                "plant": plant.describe(),
                "artifact": path,
                "stores": None if not keep_stores else {"real": pr.uri, "synthetic": ps.uri},
                "mu": manifest["mu"],
                "top_si": _top_scores(tensors),
                **rec,
                "min_si": float(min(si)),
                "seconds": round(time.perf_counter() - t0, 2),
                "_plant": plant,
            })
    return {"clean": clean, "runs": runs}


# ------------------------------------------------------------------------------ tokens


class TokenView:
    """``(N, H, W, D)`` tokens read batch by batch as float32: ``base`` plus a planted field,
    then a SOAP head (``ẑ = Pφ z``), each optional. What the protocols slice."""

    def __init__(self, base, field: np.ndarray | None = None, head=None):
        self.base, self.add, self.head = base, field, head
        self.shape = tuple(base.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError("TokenView takes slices of images")
        z = np.asarray(self.base[index], dtype=np.float32)
        if self.add is not None:
            z = z + self.add
        if self.head is not None:
            import torch

            with torch.no_grad():
                z = self.head(torch.from_numpy(np.ascontiguousarray(z))).numpy()
        return z


# ------------------------------------------------------------------------------ evaluation


@dataclass
class _EvalInputs:
    query: np.ndarray  # clean eval tokens (N, H, W, D)
    bank: np.ndarray | None  # clean real-store tokens (M, H, W, D)
    masks: np.ndarray | None
    label_maps: np.ndarray | None
    labels: np.ndarray | None
    bank_patch_labels: np.ndarray | None
    bank_labels: np.ndarray | None
    n_seg_classes: int | None
    n_classes: int | None
    image_size: int
    data: dict = field(default_factory=dict)


def _matching_data(spec: str, n: int, store) -> object:
    """The evaluation dataset whose images are exactly the store's, in order."""
    from soapflow.evaluation.datasets import open_eval_data
    from soapflow.extract import source_fingerprint

    data = open_eval_data(spec, n=n)
    src = getattr(data, "source", None)
    if src is None or source_fingerprint(src) != store.attrs.get("fingerprint"):
        raise SoapError(
            f"{spec}: the planted benchmark evaluates on images it extracted into a feature store and needs the "
            "same images with targets; use fashion-mnist[:train|:test]"
        )
    return data


def _eval_inputs(real_store, eval_store, data: PlantedData, ev: EvalSettings) -> _EvalInputs:
    from soapflow.evaluation.knn import patch_labels

    size = int(eval_store.attrs.get("image_size") or data.image_size)
    grid = eval_store.grid
    need_bank = any(e in ev.evaluations for e in ("knn-seg", "knn-cls"))
    test = _matching_data(data.eval_data, data.n_eval, eval_store)
    bank = _matching_data(data.real, data.n_real, real_store) if need_bank else None
    n, m = eval_store.count, real_store.count
    out = _EvalInputs(np.asarray(eval_store.tokens[:]), np.asarray(real_store.tokens[:]) if need_bank else None,
                      None, None, None, None, None, None, None, size,
                      {"eval_data": test.describe(), "bank_data": bank.describe() if bank else None})
    if "salient" in ev.evaluations:
        if not test.has_masks:
            raise SoapError(f"{test.spec} has no masks for TokenCut")
        out.masks = test.masks(range(n), size)
    if "knn-seg" in ev.evaluations:
        if not (test.has_label_maps and bank.has_label_maps):
            raise SoapError(f"knn-seg needs label maps in {test.spec} and {bank.spec}")
        out.label_maps = test.label_maps(range(n), size)
        out.bank_patch_labels = np.stack([patch_labels(bank.label_map(i, size), grid) for i in range(m)])
        out.n_seg_classes = max(test.n_seg_classes(size, range(n)), bank.n_seg_classes(size, range(m)))
    if "knn-cls" in ev.evaluations:
        if not (test.has_labels and bank.has_labels):
            raise SoapError(f"knn-cls needs class labels in {test.spec} and {bank.spec}")
        out.labels = np.asarray(test.labels[:n])
        out.bank_labels = np.asarray(bank.labels[:m])
        out.n_classes = int(max(out.labels.max(), out.bank_labels.max())) + 1
    return out


def _condition(inp: _EvalInputs, ev: EvalSettings, add, head, progress: bool, desc: str) -> dict:
    """Per-image results of every evaluation for one condition (tokens ``+ add``, then ``head``)."""
    from soapflow.evaluation import protocols as P

    query = TokenView(inp.query, add, head)
    out = {}
    if "salient" in ev.evaluations:
        out["salient"] = P.tokencut_images(query, inp.masks, tau=ev.taus[0], progress=progress,
                                           desc=f"tokencut {desc}")
    if "knn-seg" in ev.evaluations or "knn-cls" in ev.evaluations:
        bank = TokenView(inp.bank, add, head)
    if "knn-seg" in ev.evaluations:
        feats, labels = P.build_bank(bank, inp.bank_patch_labels, max_patches=ev.bank_patches, seed=ev.seed)
        out["knn-seg"] = P.knn_segment_images(query, inp.label_maps, feats, labels, n_classes=inp.n_seg_classes,
                                              k=ev.knn_seg_k, progress=progress, desc=f"knn-seg {desc}")
    if "knn-cls" in ev.evaluations:
        out["knn-cls"] = P.knn_classify(P.pooled(query), P.pooled(bank), inp.bank_labels, k=ev.knn_cls_k,
                                        n_classes=inp.n_classes)
    return out


def _paired(evaluation: str, a, b, inp: _EvalInputs, ev: EvalSettings):
    """Paired bootstrap of one metric, condition ``a`` (as "raw") vs ``b`` (as "soap")."""
    from soapflow.evaluation import protocols as P

    kw = dict(n_boot=ev.n_boot, seed=ev.seed)
    if evaluation == "salient":
        return P.compare_salient(a, b, **kw)["max_fbeta"]
    if evaluation == "knn-seg":
        return P.compare_knn_seg(a, b, **kw)["miou"]
    return P.compare_knn_cls(inp.labels, a, b, **kw)


def _metric_summary(clean_pair, loss, soap_gain, residual) -> dict:
    """The four conditions of one metric and what they say.

    ``recovered_fraction`` = 1 − (clean+SOAP − planted+SOAP)/(clean − planted): the share of the
    loss planting caused that is gone once SOAP is applied, compared like for like (SOAP with
    SOAP). Only given where planting's loss is significant (its CI excludes 0)."""
    clean, clean_soap = clean_pair.raw, clean_pair.soap
    planted, planted_soap = soap_gain.raw, soap_gain.soap
    lost = clean - planted
    frac = None
    if loss.significant and lost > 0:
        frac = 1.0 - (clean_soap - planted_soap) / lost
    lo, hi = clean_pair.soap_ci
    return {
        "clean": clean,
        "clean_soap": clean_soap,
        "planted": planted,
        "planted_soap": planted_soap,
        "clean_soap_ci95": list(clean_pair.soap_ci),
        "loss": loss.to_dict()["delta"],
        "soap_gain": soap_gain.to_dict()["delta"],
        "residual": residual.to_dict()["delta"],
        "planting_hurt": bool(loss.significant and lost > 0),
        "recovered_fraction": frac,
        "within_paired_ci": bool(residual.delta_ci[0] <= 0 <= residual.delta_ci[1]),
        "within_clean_soap_ci": bool(lo <= planted_soap <= hi),
    }


def evaluate_sweep(sweep: dict, inp: _EvalInputs, ev: EvalSettings, *, progress: bool = True) -> dict:
    """Zero-shot metrics for clean / clean+SOAP once and planted / planted+SOAP per run (in place)."""
    from soapflow.head import SOAPHead

    clean_head = SOAPHead.from_artifact(sweep["clean"]["artifact"])
    clean = _condition(inp, ev, None, None, progress, "clean")
    clean_soap = _condition(inp, ev, None, clean_head, progress, "clean+SOAP")
    clean_pairs = {e: _paired(e, clean[e], clean_soap[e], inp, ev) for e in ev.evaluations}
    sweep["clean"]["metrics"] = {METRICS[e][0]: p.to_dict() for e, p in clean_pairs.items()}
    for run in sweep["runs"]:
        plant = run["_plant"]
        add = plant.field()
        head = SOAPHead.from_artifact(run["artifact"])
        planted = _condition(inp, ev, add, None, progress, f"{run['tag']}")
        planted_soap = _condition(inp, ev, add, head, progress, f"{run['tag']}+SOAP")
        run["metrics"] = {}
        for e in ev.evaluations:
            run["metrics"][METRICS[e][0]] = _metric_summary(
                clean_pairs[e],
                _paired(e, clean[e], planted[e], inp, ev),
                _paired(e, planted[e], planted_soap[e], inp, ev),
                _paired(e, clean_soap[e], planted_soap[e], inp, ev),
            )
    return sweep


# ------------------------------------------------------------------------------ the run


def _extract_clean(data: PlantedData, work_dir: str, need_eval: bool, progress: bool) -> dict:
    from soapflow.extract import extract

    roles = [("real", data.real, data.n_real), ("synthetic", data.synth, data.n_synth)]
    if need_eval:
        roles.append(("eval", data.eval_data, data.n_eval))
    backbone = BackboneSpec(data.backbone, weights=data.weights, layer=data.layer, final_norm=data.final_norm,
                            image_size=data.image_size, device=data.device)
    uris, rates = {}, {}
    for role, spec, n in roles:
        store, stats = extract(backbone, spec, os.path.join(work_dir, "clean", role), n=n, chunk=data.chunk,
                               seed=data.seed, progress=progress)
        uris[role] = store.uri
        rates[role] = round(stats.images_per_second, 2) if stats.images else None
    return {"uris": uris, "images_per_second": rates}


def _natural_note(run: dict) -> str:
    if "effective_max_angle_deg" not in run or max(d["natural_ratio"] for d in run["directions"]) < 0.1:
        return ""  # the clean tokens' own positional part along the patterns is too small to matter
    ratios = ", ".join(f"{d['natural_ratio']:.2f}" for d in run["directions"])
    tilts = ", ".join(f"{d['angle_u_to_effective_deg']:.1f}°" for d in run["directions"])
    return (f" The clean tokens' own per-position mean already varies with these patterns (‖g_j‖/c_j = {ratios}), "
            f"so the positional artifact present with pattern a_j is c_j·u_j + g_j ({tilts} from u_j); the "
            f"suppressed subspace is within {run['effective_max_angle_deg']:.1f}° of their span.")


def _notes(report: dict) -> list[str]:
    notes = []
    for run in report["runs"]:
        if not run["recovered"]:
            dirs = ", ".join(f"{d['angle_to_suppressed_deg']:.1f}°" for d in run["directions"])
            cos = ", ".join(f"{d['best_abs_cos']:.2f}" for d in run["directions"])
            notes.append(
                f"k={run['k']} at {run['amplitude']:g}×: not recovered — largest principal angle "
                f"{run['max_angle_deg']:.1f}° (> {MAX_ANGLE_DEG:g}°); each direction's angle to the suppressed "
                f"subspace: {dirs}; the component best aligned with each has |cos| {cos}; planted SI min "
                f"{run['min_si']:.3f}; {run['n_suppressed']} components suppressed."
                + (f" A planted direction adds at most λ_max of variance here, as much as the natural top "
                   f"components (λ = {', '.join(f'{v:.3g}' for v in report['clean']['eigenvalues_top'][:3])}), "
                   "so PCA mixes planted and natural directions." if run["amplitude"] <= 1 else "")
                + _natural_note(run)
            )
    if any(e == "knn-cls" for e in report["config"]["evaluations"]):
        notes.append("kNN top-1 uses mean-pooled patch tokens; every planted pattern sums to zero over the grid, "
                     "so planting leaves pooled tokens unchanged (up to store rounding) by construction.")
    return notes


def run_planted(data: PlantedData, planting: Planting, ev: EvalSettings | None, work_dir: str, *,
                keep_stores: bool = False, progress: bool = True) -> dict:
    """Extract (or reuse) the clean stores in ``work_dir``, run the sweep, evaluate; a JSON-able report."""
    from soapflow import __version__
    from soapflow.storage.feature_store import FeatureStore

    ev = ev or EvalSettings(evaluations=())
    t0 = time.perf_counter()
    clean = _extract_clean(data, work_dir, bool(ev.evaluations), progress)
    uris = clean["uris"]
    t1 = time.perf_counter()
    sweep = fit_sweep(uris["real"], uris["synthetic"], planting, os.path.join(work_dir, "sweep"),
                      keep_stores=keep_stores, progress=progress)
    t2 = time.perf_counter()
    data_info = {}
    if ev.evaluations:
        real_store, eval_store = FeatureStore.open(uris["real"]), FeatureStore.open(uris["eval"])
        inp = _eval_inputs(real_store, eval_store, data, ev)
        data_info = inp.data
        evaluate_sweep(sweep, inp, ev, progress=progress)
    t3 = time.perf_counter()
    real_store = FeatureStore.open(uris["real"])
    attrs = real_store.attrs
    for run in sweep["runs"]:
        run.pop("_plant", None)
    report = {
        "schema": 1,
        "evaluation": "planted",
        "backbone": {key: attrs.get(key) for key in ("backbone", "weights", "layer", "feature", "final_norm",
                                                     "image_size", "grid", "dim") if key in attrs},
        "data": {"real": data.real, "n_real": data.n_real, "synthetic": data.synth, "n_synth": data.n_synth,
                 "eval": data.eval_data if ev.evaluations else None, "n_eval": data.n_eval if ev.evaluations else 0,
                 "bank": "the real fit store" if data_info.get("bank_data") else None, **data_info},
        "stores": uris,
        "config": {"ks": list(planting.ks), "amplitudes": list(planting.amplitudes), "seed": planting.seed,
                   "mu": planting.mu, "tau": planting.tau, "threshold": planting.threshold,
                   "plant": planting.plant, "quiet_eigenvalue": QUIET_EIGENVALUE,
                   "max_angle_deg": MAX_ANGLE_DEG, "patterns": "DCT-II cosines cos(π f_y (h+½)/H)·cos(π f_x (w+½)/W), "
                   "unit RMS; c_j² = amplitude · λ_max(clean real tokens)",
                   "suppressed": "weight > 0.5 · score (soapflow.method.suppressed)",
                   "evaluations": list(ev.evaluations), "salient_tau": ev.taus[0], "knn_seg_k": ev.knn_seg_k,
                   "knn_cls_k": ev.knn_cls_k, "bank_patches": ev.bank_patches, "n_boot": ev.n_boot},
        "clean": sweep["clean"],
        "runs": sweep["runs"],
        "summary": _summary(sweep["runs"], ev),
        "timing_s": {"extract": round(t1 - t0, 2), "fits": round(t2 - t1, 2), "evaluate": round(t3 - t2, 2),
                     "total": round(time.perf_counter() - t0, 2)},
        "images_per_second": clean["images_per_second"],
        "soapflow_version": __version__,
        "created": utc_now(),
    }
    report["notes"] = _notes(report)
    return report


def _summary(runs: list[dict], ev: EvalSettings) -> dict:
    strong = [r for r in runs if r["amplitude"] >= 2]
    out = {
        "recovered_at_2x_and_above": bool(strong) and all(r["recovered"] for r in strong),
        "not_recovered": [r["tag"] for r in runs if not r["recovered"]],
    }
    if ev.evaluations:
        out["planted_soap_within_paired_ci"] = {
            r["tag"]: {m: v["within_paired_ci"] for m, v in r["metrics"].items()} for r in runs}
    return out


# ------------------------------------------------------------------------------ output


def _pct(x):
    return "—" if x is None else f"{100 * x:.2f}"


def _where_planted(config: dict, clean: dict | None = None) -> str:
    if config.get("plant") == "quiet":
        avoided = (clean or {}).get("n_avoided")
        count = "" if avoided is None else f" ({avoided} of them)"
        return (" Planted where the clean tokens are quiet (`--plant quiet`): the cosines their per-position mean "
                "varies least along, and directions orthogonal to their principal components with eigenvalue ≥ "
                f"{config.get('quiet_eigenvalue', QUIET_EIGENVALUE):g}·λ_max{count}, so u_j is the ground truth.")
    if config.get("plant") == "plain":
        return " Planted at the lowest frequencies along random directions (`--plant plain`)."
    return ""


def markdown_table(report: dict) -> str:
    """Markdown: the recovery table, then (when evaluated) one zero-shot table per metric."""
    lines = [
        "| k | amplitude | largest angle | angles (°) | recovered | largest angle to c·u + g "
        "| planted SI (direction / best component) | suppressed (not planted) |",
        "|---:|---:|---:|---|:---:|---:|---|---:|",
    ]
    for r in report["runs"]:
        si = ", ".join(f"{d['si']:.3f} / {d['best_score']:.3f}" for d in r["directions"])
        angles = ", ".join(f"{a:.1f}" for a in r["principal_angles_deg"])
        eff = f"{r['effective_max_angle_deg']:.1f}°" if "effective_max_angle_deg" in r else "—"
        lines.append(f"| {r['k']} | {r['amplitude']:g}× | {r['max_angle_deg']:.1f}° | {angles} | "
                     f"{'yes' if r['recovered'] else '**no**'} | {eff} | {si} | {r['n_suppressed']} "
                     f"({r['n_suppressed_not_planted']}) |")
    clean = report["clean"]
    lines.append("")
    lines.append("Angles are principal angles between the suppressed subspace (weight > 0.5 · score) and "
                 "span(u_j); recovered = largest ≤ " f"{MAX_ANGLE_DEG:g}°. c·u + g: the positional artifact "
                 "actually present with each planted pattern a_j — the planted c_j·u_j plus g_j, the clean "
                 "tokens' own per-position mean along a_j." + _where_planted(report["config"], report.get("clean")))
    lines.append("")
    lines.append(f"Clean fit: λ_max = {clean['lambda_max']:.4g}, μ = {clean['mu']:g}, "
                 f"{clean['n_suppressed']} components suppressed, top SI "
                 + ", ".join(f"{t['score']:.3f}" for t in clean["top_si"][:4]) + ".")
    for e in report["config"].get("evaluations", []):
        key, label = METRICS[e]
        lines += ["", f"**{label}** (%; Δ with its paired 95% bootstrap CI over images, * = excludes 0; "
                  "recovered = 1 − (clean+SOAP − planted+SOAP)/(clean − planted), given where planting's loss is "
                  "significant; in clean+SOAP's CI = planted+SOAP lies in clean+SOAP's own 95% CI; paired = the stricter paired "
                  "CI of planted+SOAP − clean+SOAP contains 0)", "",
                  "| k | amplitude | clean | clean+SOAP | planted | planted+SOAP | planting Δ [CI] | "
                  "planted+SOAP − clean+SOAP [CI] | recovered | in clean+SOAP's CI | paired |",
                  "|---:|---:|---:|---:|---:|---:|---|---|---:|:---:|:---:|"]
        for r in report["runs"]:
            m = r["metrics"][key]

            def d(x):
                lo, hi = x["ci95"]
                star = " *" if x["significant"] else ""
                return f"{100 * x['value']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{star}"

            frac = "—" if m["recovered_fraction"] is None else f"{100 * m['recovered_fraction']:.0f} %"
            lines.append(f"| {r['k']} | {r['amplitude']:g}× | {_pct(m['clean'])} | {_pct(m['clean_soap'])} | "
                         f"{_pct(m['planted'])} | {_pct(m['planted_soap'])} | {d(m['loss'])} | {d(m['residual'])} | "
                         f"{frac} | {'yes' if m['within_clean_soap_ci'] else 'no'} | {'yes' if m['within_paired_ci'] else 'no'} |")
    if report.get("notes"):
        lines.append("")
        lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines)


def print_report(report: dict, console=None) -> None:
    """Rich tables: recovery per (k, amplitude), then the zero-shot summary."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    b = report.get("backbone", {})
    t = Table(title=f"planted artifacts — {b.get('backbone')} layer {b.get('layer')}, "
                    f"{report['data']['real']} ({report['data']['n_real']}) + {report['data']['synthetic']} "
                    f"({report['data']['n_synth']})")
    for col in ("k", "amplitude", "largest angle", "angles (°)", "recovered", "to c·u+g", "planted SI",
                "suppressed (not planted)"):
        t.add_column(col, justify="left" if col in ("angles (°)", "planted SI") else "right")
    for r in report["runs"]:
        t.add_row(str(r["k"]), f"{r['amplitude']:g}×", f"{r['max_angle_deg']:.1f}°",
                  ", ".join(f"{a:.1f}" for a in r["principal_angles_deg"]),
                  "yes" if r["recovered"] else "[red]no[/red]",
                  f"{r['effective_max_angle_deg']:.1f}°" if "effective_max_angle_deg" in r else "—",
                  ", ".join(f"{d['si']:.3f}" for d in r["directions"]),
                  f"{r['n_suppressed']} ({r['n_suppressed_not_planted']})")
    console.print(t)
    evs = report["config"].get("evaluations", [])
    if evs:
        t = Table(title=f"zero-shot, {report['data'].get('eval')} (n={report['data'].get('n_eval')}), %")
        t.add_column("k")
        t.add_column("amp")
        for e in evs:
            t.add_column(f"{METRICS[e][1]}: planted → +SOAP (clean+SOAP)", justify="right")
            t.add_column("recovered / in CI", justify="right")
        for r in report["runs"]:
            row = [str(r["k"]), f"{r['amplitude']:g}×"]
            for e in evs:
                m = r["metrics"][METRICS[e][0]]
                frac = "—" if m["recovered_fraction"] is None else f"{100 * m['recovered_fraction']:.0f}%"
                row += [f"{_pct(m['planted'])} → {_pct(m['planted_soap'])} ({_pct(m['clean_soap'])})",
                        f"{frac} / {'yes' if m['within_paired_ci'] else 'no'}"]
            t.add_row(*row)
        console.print(t)
    for n in report.get("notes", []):
        console.print(f"• {n}")
    s = report["summary"]
    console.print(f"every planted direction recovered at amplitudes ≥ 2×: "
                  f"{'yes' if s['recovered_at_2x_and_above'] else 'NO'}")


def plot_report(report: dict, path: str) -> str:
    """PNG: largest principal angle and the lowest planted SI vs amplitude, one line per k; with
    evaluations, planted (dashed) and planted+SOAP (solid) minus clean+SOAP per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evs = report["config"].get("evaluations", [])
    panels = 2 + len(evs)
    ncol = min(3, panels)
    nrow = -(-panels // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 3.2 * nrow), squeeze=False)
    axes = axes.ravel()
    for i, k in enumerate(report["config"]["ks"]):
        color = f"C{i}"
        runs = sorted((r for r in report["runs"] if r["k"] == k), key=lambda r: r["amplitude"])
        amps = [r["amplitude"] for r in runs]
        axes[0].plot(amps, [r["max_angle_deg"] for r in runs], "o-", color=color, label=f"k={k}: to span(u)")
        if all("effective_max_angle_deg" in r for r in runs):
            axes[0].plot(amps, [r["effective_max_angle_deg"] for r in runs], "s:", color=color, alpha=0.7,
                         label=f"k={k}: to span(c·u + g)")
        axes[1].plot(amps, [r["min_si"] for r in runs], "o-", color=color, label=f"k={k}")
        for ax, e in zip(axes[2:], evs):
            key = METRICS[e][0]
            ax.plot(amps, [100 * (r["metrics"][key]["planted"] - r["metrics"][key]["clean_soap"]) for r in runs],
                    "x--", color=color, alpha=0.6, label=f"planted, k={k}")
            ax.plot(amps, [100 * (r["metrics"][key]["planted_soap"] - r["metrics"][key]["clean_soap"]) for r in runs],
                    "o-", color=color, label=f"planted+SOAP, k={k}")
    axes[0].axhline(MAX_ANGLE_DEG, color="0.4", ls=":", lw=1)
    axes[0].set_title("recovery: largest principal angle (°)", fontsize=9)
    axes[1].axhline(report["config"]["threshold"], color="0.4", ls=":", lw=1)
    axes[1].set_title("lowest SI of a planted direction", fontsize=9)
    for ax, e in zip(axes[2:], evs):
        ax.axhline(0, color="0.4", ls=":", lw=1)
        ax.set_title(f"{METRICS[e][1]}: − clean+SOAP (points)", fontsize=9)
        ax.legend(fontsize=6)
    amps = sorted(report["config"]["amplitudes"])
    for ax in axes[:panels]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(amps, [f"{a:g}×" for a in amps])
        ax.minorticks_off()
        ax.set_xlabel("amplitude (× λ_max of the clean tokens)", fontsize=8)
    for ax in axes[panels:]:
        ax.axis("off")
    axes[0].legend(fontsize=8)
    b = report.get("backbone", {})
    fig.suptitle(f"planted artifacts: {b.get('backbone')} layer {b.get('layer')}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
