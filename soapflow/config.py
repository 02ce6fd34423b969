"""The settings of a fit, a backbone and a refit: small frozen dataclasses, validated once.

Defaults live here and nowhere else. Flows, tasks, the catalog, ``soap scan`` and the CLI build
these objects and pass them whole; Prefect shows (and validates) them as flow parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from soapflow.errors import SoapError

DEFAULT_MU = 2.0
DEFAULT_TAU = 0.05
DEFAULT_GAMMA = 1.0
DEFAULT_THRESHOLD = 0.75
DEFAULT_BACKBONE = "dinov2_vits14"


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
