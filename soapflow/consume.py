"""Using a published projection at inference.

    import soapflow
    from soapflow.backbones import load_backbone
    head = soapflow.load_head("dinov2_vits14/11@production")  # pulled once, hash-verified, cached
    bb = load_backbone("dinov2_vits14", layer=11)
    with soapflow.attach(bb, head) as model:                  # layer from the head's manifest
        tokens = model.tokens(images)                         # (B, H, W, D): block 11's corrected patch tokens
        pooled = model(images)                                # what bb.model returns; later blocks see corrected tokens

The cache is ``$SOAPFLOW_CACHE/heads/<name>/<version>`` (default ``~/.cache/soapflow``,
``$XDG_CACHE_HOME`` honoured). A cached copy is used only while it still verifies and its
content hash is the one the registry holds for that version.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soapflow.errors import SoapError
from soapflow.head import SOAPHead


def cache_root() -> Path:
    env = os.environ.get("SOAPFLOW_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "soapflow"


def pull_cached(ref: str, registry=None, storage_options: dict | None = None) -> Path:
    """The artifact directory of ``ref`` in the local cache, pulling it when absent or stale."""
    from soapflow.storage.artifact import verify_artifact
    from soapflow.storage.registry import Registry

    reg = registry if isinstance(registry, Registry) else Registry(registry, storage_options)
    name, version = reg.resolve(ref)
    expected = reg.content_hash(f"{name}:{version}")
    target = cache_root() / "heads" / name / str(version)
    if target.is_dir():
        try:
            if verify_artifact(target).get("content_hash") == expected:
                return target
        except SoapError:
            pass  # corrupt or from another registry: pull again
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        reg.pull(f"{name}:{version}", tmp)
        if target.exists():
            trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, trash)
            except FileNotFoundError:
                trash = None
            os.rename(tmp, target)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)
            except OSError:  # another process cached it meanwhile: use theirs if it verifies
                if verify_artifact(target).get("content_hash") != expected:
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_head(ref: str, registry=None, storage_options: dict | None = None) -> SOAPHead:
    """A :class:`SOAPHead` for a registry ref (``name``, ``name@alias``, ``name:3``).

    ``registry`` is a root (path or ``s3://`` URL), a ``Registry``, or None for
    ``$SOAPFLOW_REGISTRY`` / the per-user default. The head's ``manifest`` carries the
    registry name and version."""
    path = pull_cached(ref, registry, storage_options)
    return SOAPHead.from_artifact(path)


_ATTACHED = "_soapflow_attached_block"  # set on a model while a head is attached to it


def _blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(blocks, "__len__"):
        raise SoapError(f"attach: {type(model).__name__} has no 'blocks' (expects a timm ViT or a soapflow Backbone)")
    return blocks


class SOAPAttached(nn.Module):
    """A ViT whose block ``layer`` outputs SOAP-corrected patch tokens.

    The correction is a forward hook on ``model.blocks[layer]`` that maps the patch tokens
    (everything after ``model.num_prefix_tokens``) through the head and leaves class/register
    tokens alone; every later block, the final norm and the classifier see the corrected tokens.
    A head fitted after the final norm (``final_norm`` in its manifest; the default at the last
    block) hooks ``model.norm`` instead: it corrects ``forward_features``' patch tokens.

    It changes ``model`` in place: the hook is registered on the model itself, so it applies to any
    call into it (``forward``, ``forward_features``, ``forward_intermediates``) until :meth:`detach`;
    use ``with attach(...) as m:`` to scope it. A second attach to the same model is refused.

    What comes out: ``m(x)`` is whatever the model returns (for a timm ViT built with
    ``num_classes=0``, the *pooled* feature vector of the last block, computed from corrected
    tokens); ``m.tokens(x)`` is the corrected patch tokens of block ``layer`` as ``(B, H, W, D)``;
    ``m.model.forward_features(x)`` is every token of the last block after the final norm.
    """

    def __init__(self, model: nn.Module, head: SOAPHead, layer: int, after_norm: bool = False):
        super().__init__()
        blocks = _blocks(model)
        depth = len(blocks)
        if not -depth <= int(layer) < depth:
            raise SoapError(f"attach: layer {layer} is out of range for a model with {depth} blocks")
        dim = int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0) or 0)
        if dim and dim != head.in_features:
            raise SoapError(
                f"attach: the head has D={head.in_features} but the model's tokens have D={dim}; "
                "was it fitted on another backbone?"
            )
        previous = getattr(model, _ATTACHED, None)
        if previous is not None:
            raise SoapError(
                f"attach: this model already has a SOAP head attached at block {previous}; attaching another "
                "would project twice. Call .detach() on the first (or use `with attach(...)`) before attaching again"
            )
        self.model = model
        self.head = head
        self.layer = int(layer) % depth
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.after_norm = bool(after_norm)
        target = blocks[self.layer]
        if self.after_norm:
            norm = getattr(model, "norm", None)
            if self.layer != depth - 1 or not isinstance(norm, nn.Module) or isinstance(norm, nn.Identity):
                raise SoapError(
                    f"attach: the head was fitted on block {self.layer}'s tokens after the final norm, which "
                    f"the model only computes after its last block ({depth - 1}); refit it with --final-norm auto"
                )
            target = norm
        self._handle = target.register_forward_hook(self._hook)
        object.__setattr__(model, _ATTACHED, self.layer)  # a plain attribute, not a registered submodule

    def _hook(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 3:
            raise SoapError(f"attach: block {self.layer} returned {type(output).__name__}, expected (B, N, D) tokens")
        n = self.num_prefix_tokens
        weight = self.head.weight.to(device=output.device, dtype=output.dtype)
        patches = nn.functional.linear(output[:, n:], weight)
        return torch.cat([output[:, :n], patches], dim=1) if n else patches

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """SOAP-corrected patch tokens of block ``layer`` as ``(B, H, W, D)`` (after the final norm
        for a head fitted there)."""
        with torch.inference_mode():
            if self.after_norm:
                feats = self.model.forward_features(images)[:, self.num_prefix_tokens:]
            else:
                (feats,) = self.model.forward_intermediates(
                    images, indices=[self.layer], output_fmt="NLC", intermediates_only=True, stop_early=True
                )
        b, n, d = feats.shape
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is not None and grid[0] * grid[1] == n:
            h, w = int(grid[0]), int(grid[1])
        else:
            h = w = int(round(n**0.5))
            if h * w != n:
                return feats.float()
        return feats.float().reshape(b, h, w, d)

    def detach(self) -> nn.Module:
        """Remove the hook; the model is unchanged afterwards. Returns the bare model."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            if getattr(self.model, _ATTACHED, None) is not None:
                object.__delattr__(self.model, _ATTACHED)
        return self.model

    def __enter__(self) -> SOAPAttached:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(model: Any, head: SOAPHead | str, layer: int | None = None, *, strict: bool = True,
           **load_kwargs) -> SOAPAttached:
    """Attach a SOAP head to a ViT (timm model or soapflow ``Backbone``) at block ``layer``, in
    place (see :class:`SOAPAttached` for what then comes out, and :meth:`SOAPAttached.detach`).

    ``head`` may be a registry ref, loaded with :func:`load_head` (``load_kwargs`` go there).
    ``layer`` defaults to the head manifest's layer (a soapflow Backbone's own layer next). A
    ``layer`` that differs from the manifest's, a model with another token width, or a head fitted
    on q/k/v features is refused; ``strict=False`` turns the layer mismatch into a warning."""
    if isinstance(head, str):
        head = load_head(head, **load_kwargs)
    if not isinstance(head, SOAPHead):
        raise SoapError(f"attach: expected a SOAPHead or a registry ref, got {type(head).__name__}")
    manifest = head.manifest or {}
    feature = manifest.get("feature") or "out"
    if feature != "out":
        raise SoapError(
            f"attach: this head was fitted on {feature!r} features; only 'out' (block output) "
            "heads can be attached to the token stream"
        )
    bb_layer = None
    if hasattr(model, "model") and hasattr(model, "tokens") and hasattr(model, "layer"):  # a Backbone
        bb_layer = model.layer
        model = model.model
    fitted = manifest.get("layer")
    if layer is None:
        layer = fitted if fitted is not None else bb_layer
        if layer is None:
            raise SoapError("attach: pass layer= (the head's manifest names none)")
    elif fitted is not None:
        depth = len(_blocks(model))
        if -depth <= int(layer) < depth and int(layer) % depth != int(fitted) % depth:
            message = (f"attach: the head was fitted on block {fitted} (its manifest) but layer={layer} was given; "
                       f"its components describe block {fitted}'s tokens. Leave layer out to use the manifest's")
            if strict:
                raise SoapError(message + ", or pass strict=False")
            import warnings

            warnings.warn(message, stacklevel=2)
    return SOAPAttached(model, head, int(layer), after_norm=bool((head.manifest or {}).get("final_norm", False)))
