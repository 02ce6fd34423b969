"""SOAPHead: the projector as one bias-free linear layer, ``ẑ = Pφ z`` on raw tokens."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn


class SOAPHead(nn.Linear):
    """Applies ``Pφ`` to the last dimension of ``(..., D)`` tokens: raw (uncentered) patch tokens
    of the block it was fitted on, as a torch tensor (same dtype and device back) or a NumPy array
    (an array of the same dtype back; integers become float32).

    ``nn.Linear`` computes ``z Wᵀ``; with ``W = Pφ`` (symmetric) that is ``Pφ z`` per token.
    """

    def __init__(self, projector: torch.Tensor, manifest: dict | None = None):
        projector = torch.as_tensor(projector, dtype=torch.float32)
        if projector.ndim != 2 or projector.shape[0] != projector.shape[1]:
            raise ValueError(f"projector must be square (D, D), got {tuple(projector.shape)}")
        super().__init__(projector.shape[0], projector.shape[0], bias=False)
        with torch.no_grad():
            self.weight.copy_(projector)
        self.weight.requires_grad_(False)
        self.manifest = manifest or {}

    @classmethod
    def from_artifact(cls, path: str | os.PathLike) -> SOAPHead:
        """Load from an artifact directory, verifying its content hash first."""
        from soapflow.storage.artifact import read_artifact

        artifact = read_artifact(path)
        return cls(torch.from_numpy(artifact.projector.copy()), artifact.manifest)

    def forward(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if isinstance(tokens, np.ndarray):
            array = tokens if np.issubdtype(tokens.dtype, np.floating) else tokens.astype(np.float32)
            with torch.no_grad():
                return self.forward(torch.from_numpy(np.ascontiguousarray(array))).numpy()
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"SOAPHead takes tokens as a torch.Tensor or NumPy array of shape (..., {self.in_features}), "
                            f"got {type(tokens).__name__}")
        if tokens.ndim == 0 or tokens.shape[-1] != self.in_features:
            raise ValueError(f"SOAPHead expects tokens of shape (..., {self.in_features}) (D last), "
                             f"got shape {tuple(tokens.shape)} (this head's D={self.in_features})")
        if not tokens.is_floating_point():
            tokens = tokens.float()
        return nn.functional.linear(tokens, self.weight.to(device=tokens.device, dtype=tokens.dtype))
