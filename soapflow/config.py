"""The settings of a fit, a backbone and a refit: small frozen dataclasses, validated once.

Defaults live here and nowhere else. Flows, tasks, the catalog, ``soap scan`` and the CLI build
these objects and pass them whole; Prefect shows (and validates) them as flow parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from soapflow.errors import SoapError

from soapflow.defaults import (  # noqa: E402  (defined once, in a module that imports nothing)
    DEFAULT_BACKBONE, DEFAULT_DATA, DEFAULT_DTYPE, DEFAULT_GAMMA, DEFAULT_GENERATOR, DEFAULT_MU, DEFAULT_TAU,
    DEFAULT_THRESHOLD,
)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Auto:
    """Automatic μ: the number of components whose SI score is above ``threshold``
    (None: the fit's own ``threshold``)."""

    threshold: float | None = None


@dataclass(frozen=True)
class FitParams:
    """SOAP's parameters (SPEC §1 steps 5–6). ``mu`` is a number ≥ 0 or ``Auto()``; ``suppress``
    instead removes these eigenvalue ranks fully (the authors' manual truncation)."""

    mu: float | Auto = DEFAULT_MU
    tau: float = DEFAULT_TAU
    gamma: float = DEFAULT_GAMMA
    threshold: float | None = None  # None: the Auto's own, else DEFAULT_THRESHOLD
    suppress: tuple[int, ...] | None = None

    def __post_init__(self):
        mu, threshold = self.mu, self.threshold
        if isinstance(mu, Auto):
            if mu.threshold is not None and threshold is not None and mu.threshold != threshold:
                raise SoapError(f"two thresholds for automatic μ: {mu.threshold} and {threshold}")
            threshold = mu.threshold if mu.threshold is not None else threshold
        elif not _number(mu) or not mu >= 0 or mu == math.inf:
            raise SoapError(f"--mu must be ≥ 0 or 'auto', got {mu!r}")
        else:
            mu = float(mu)
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        if not _number(threshold) or not math.isfinite(threshold):
            raise SoapError(f"--threshold must be a number, got {threshold!r}")
        if not _number(self.tau) or not self.tau > 0 or self.tau == math.inf:
            raise SoapError(f"--tau must be > 0, got {self.tau}")
        if not _number(self.gamma) or not self.gamma > 0 or self.gamma == math.inf:
            raise SoapError(f"--gamma must be > 0, got {self.gamma}")
        suppress = self.suppress
        if suppress is not None:
            if isinstance(suppress, (str, bytes)) or not all(_number(r) and int(r) == r for r in suppress):
                raise SoapError(f"--suppress takes eigenvalue ranks like 0,3, got {suppress!r}")
            suppress = tuple(int(r) for r in suppress)
        object.__setattr__(self, "mu", Auto(float(threshold)) if isinstance(mu, Auto) else mu)
        object.__setattr__(self, "threshold", float(threshold))
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "suppress", suppress)

    @classmethod
    def parse(cls, mu: str | float | Auto = DEFAULT_MU, **kwargs) -> FitParams:
        """From command-line or catalog text: ``mu`` a number or ``"auto"``."""
        if isinstance(mu, str) and mu.strip().lower() == "auto":
            mu = Auto()
        elif isinstance(mu, str):
            try:
                mu = float(mu)
            except ValueError:
                raise SoapError(f"--mu must be a number ≥ 0 or 'auto', got {mu!r}") from None
        return cls(mu=mu, **kwargs)

    @property
    def auto(self) -> bool:
        return isinstance(self.mu, Auto)

    @property
    def mu_label(self) -> float | str:
        """μ as manifests, the registry and JSON reports give it: a number or ``"auto"``."""
        return "auto" if self.auto else self.mu

    def registry_params(self) -> dict:
        """What the registry matches a fit on (``Registry.find_by_inputs``)."""
        return {"mu": self.mu_label, "tau": self.tau, "gamma": self.gamma, "threshold": self.threshold}


DEFAULT_CHUNK = 64  # images per store chunk: the unit of work and of resuming
FINAL_NORM = ("auto", "on", "off")  # the model's final norm: at the last block only, at every block, nowhere


def parse_final_norm(value) -> str:
    """``auto``/``on``/``off`` from a CLI string, a flow parameter or a catalog entry (YAML reads a
    bare ``on``/``off`` as a boolean, so booleans are accepted too)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in FINAL_NORM:
        return value.strip().lower()
    raise SoapError(f"final norm must be one of {', '.join(FINAL_NORM)}, got {value!r}")


@dataclass(frozen=True)
class BackboneSpec:
    """Which tokens: a backbone (catalog or timm name), its weights (None: the catalog's;
    ``"random"``; a path), block, token kind, final-norm policy, input size and device
    (None: cuda if available)."""

    name: str = DEFAULT_BACKBONE
    weights: str | None = None
    layer: int = -1
    feature: str = "out"
    final_norm: str | bool = "auto"  # FINAL_NORM; a bool is read as on/off
    image_size: int | None = None
    device: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "final_norm", parse_final_norm(self.final_norm))

    def on_device(self) -> BackboneSpec:
        """This spec with the device resolved (what a loaded model is cached under)."""
        if self.device is not None:
            return self
        from soapflow.extract import default_device

        return replace(self, device=default_device())

    def at(self, layer: int) -> BackboneSpec:
        return replace(self, layer=layer)


@dataclass(frozen=True)
class DataSpec:
    """The images: the real source, the synthetic generator, how many of each, and the seed."""

    real: str = DEFAULT_DATA
    n_real: int | None = None  # None: all the source has
    generator: str = DEFAULT_GENERATOR
    n_synth: int | None = None  # None: as many as real
    seed: int = 0

    @property
    def synthetic(self) -> str:
        return f"noise:{self.generator}"


@dataclass(frozen=True)
class RunSettings:
    """How the work runs: store layout, parallelism, where it goes, progress bars."""

    chunk: int | None = None  # None: by device (soapflow.extract.default_chunk)
    dtype: str = DEFAULT_DTYPE
    shards: int = 1  # parallel extraction tasks per store
    num_workers: int | None = None  # DataLoader decode processes per extraction
    cpu_decode_share: float | None = None  # of the real images decoded by Pillow beside nvJPEG; None: by device
    workdir: str | None = None  # None: soapflow.common.default_workdir()
    dask_address: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class OutputSettings:
    """Where the artifact goes: its directory, the registry, and evaluations after publishing."""

    out: str | None = None  # None: <workdir>/artifacts/<backbone>-L<layer>
    registry: str | None = None  # None: $SOAPFLOW_REGISTRY, else the per-user registry
    storage_options: dict | None = None  # for an s3:// registry (fsspec options)
    name: str | None = None  # None: <backbone>/<layer>
    publish: bool = True
    evaluate_after: tuple[str, ...] | None = None  # e.g. ("knn-seg",): run the evaluate flow on the version
    eval_dataset: str = "fashion-mnist"
    eval_n: int | None = 1000

    def __post_init__(self):
        if self.evaluate_after is not None:
            object.__setattr__(self, "evaluate_after", tuple(self.evaluate_after))


@dataclass(frozen=True)
class RefitConfig:
    """Everything a refit needs, as the ``refit`` flow's one parameter."""

    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    fit: FitParams = field(default_factory=FitParams)
    data: DataSpec = field(default_factory=DataSpec)
    run: RunSettings = field(default_factory=RunSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    #: flat names (the catalog's and ``soap refit``'s) that differ from their field's name
    _RENAMED = {"backbone": ("backbone", "name"), "data": ("data", "real"), "mu": ("fit", "mu")}

    @classmethod
    def from_flat(cls, values: dict, *, what: str = "refit") -> RefitConfig:
        """From one flat mapping (a catalog entry, the command line): ``backbone``, ``weights``,
        ``layer``, ``data``, ``n_real``, ``mu`` (a number or ``"auto"``), ``tau``, ``chunk`` …"""
        sections: dict[str, dict] = {f.name: {} for f in fields(cls)}
        where = {f.name: (section, f.name) for section, kind in _SECTIONS.items() for f in fields(kind)}
        where.update(cls._RENAMED)
        unknown = sorted(set(values) - set(where))
        if unknown:
            raise SoapError(f"{what}: unknown settings {unknown}; known: {sorted(where)}")
        for key, value in values.items():
            section, name = where[key]
            sections[section][name] = value
        fit = sections["fit"]
        return cls(backbone=BackboneSpec(**sections["backbone"]), fit=FitParams.parse(**fit),
                   data=DataSpec(**sections["data"]), run=RunSettings(**sections["run"]),
                   output=OutputSettings(**sections["output"]))


_SECTIONS = {"backbone": BackboneSpec, "fit": FitParams, "data": DataSpec, "run": RunSettings,
             "output": OutputSettings}


EVALUATIONS = ("salient", "knn-seg", "knn-cls")


@dataclass(frozen=True)
class EvalSettings:
    """The zero-shot evaluations (SPEC §5) and their settings, raw vs SOAP."""

    evaluations: tuple[str, ...] = EVALUATIONS
    dataset: str = "fashion-mnist"
    n: int | None = 1000  # evaluation images (None: all)
    taus: tuple[float, ...] = (0.2,)  # TokenCut τ: one salient run each
    soap_tau: float | None = None  # τ for the SOAP tokens (the authors pair 0.2 raw with 0.3 SOAP)
    foreground: str = "seed"
    component: bool = False  # TokenCut: keep only the seed's connected component
    refine: bool = False
    bank: str | None = None  # kNN bank dataset (None: the other split of ``dataset``)
    bank_n: int | None = 1000
    knn_seg_k: int = 10
    knn_cls_k: int = 20
    bank_patches: int | None = 16384  # kNN-seg bank patches, a seeded subsample (None: all)
    pools: tuple[str, ...] = ("mean", "cls")
    n_boot: int = 2000
    seed: int = 0
    batch_size: int = 32
    n_grid: int = 6  # images in the PNG grids

    def __post_init__(self):
        evaluations = tuple(e for e in self.evaluations if e)
        bad = [e for e in evaluations if e not in EVALUATIONS]
        if bad:
            raise SoapError(f"unknown evaluation(s) {bad}; choose from {', '.join(EVALUATIONS)}")
        object.__setattr__(self, "evaluations", evaluations)
        object.__setattr__(self, "taus", tuple(float(t) for t in self.taus))
        object.__setattr__(self, "pools", tuple(self.pools))
        if self.knn_seg_k < 1 or self.knn_cls_k < 1:
            raise SoapError(f"kNN k must be ≥ 1, got {self.knn_seg_k} / {self.knn_cls_k}")
        if self.n_boot < 100:
            raise SoapError(f"--n-boot must be ≥ 100 for a usable 95% CI, got {self.n_boot}")
        if not self.taus or not all(-1 <= t <= 1 for t in (*self.taus, self.soap_tau or 0)):
            raise SoapError(f"--tau/--soap-tau are cosine thresholds in [-1, 1], got {self.taus} / {self.soap_tau}")
