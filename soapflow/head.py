"""SOAPHead: the projector as one bias-free linear layer, ``ẑ = Pφ z`` on raw tokens."""

from __future__ import annotations

import os

import torch
from torch import nn


class SOAPHead(nn.Linear):
    """Applies ``Pφ`` to the last dimension of ``(..., D)`` tokens.

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
        from storage.artifact import read_artifact

        artifact = read_artifact(path)
        return cls(torch.from_numpy(artifact.projector.copy()), artifact.manifest)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.in_features:
            raise ValueError(f"SOAPHead expects tokens with D={self.in_features}, got {tokens.shape[-1]}")
        return nn.functional.linear(tokens, self.weight.to(tokens.dtype))
