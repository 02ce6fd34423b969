"""load_head (registry → cached, verified SOAPHead) and attach (the head inside a ViT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soapflow.backbones import load_backbone
from soapflow.consume import attach, cache_root, load_head
from soapflow.errors import SoapError
from soapflow.head import SOAPHead
from soapflow.storage.artifact import write_artifact
from soapflow.storage.registry import Registry

LAYER = 5
D = 192  # vit_tiny


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("vit_tiny_patch16_224", weights="random", image_size=64, layer=LAYER)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def projector(d=D, k=3, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return (np.eye(d) - u @ u.T).astype(np.float32)


def make_head_artifact(path, seed=0, layer=LAYER, feature="out", d=D):
    p = projector(d, seed=seed)
    tensors = {
        "projector": p, "mean": np.zeros(d), "components": np.eye(d), "eigenvalues": np.ones(d),
        "scores": np.ones(d), "weights": np.zeros(d),
        "p": np.zeros((4, 4, d), np.float32), "q": np.zeros((4, 4, d), np.float32),
    }
    manifest = {"backbone": "vit_tiny_patch16_224", "weights": "random", "layer": layer, "feature": feature,
                "image_size": 64, "grid": [4, 4], "dim": d}
    return write_artifact(path, tensors, manifest), p


def sequence_at(model, x, upto):
    """Prefix + patch tokens after block ``upto`` (unhooked reference, timm's own steps)."""
    with torch.inference_mode():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for blk in model.blocks[: upto + 1]:
            h = blk(h)
    return h


def test_attach_corrects_patch_tokens_only(tiny, images):
    model = tiny.model
    head = SOAPHead(torch.from_numpy(projector()), {"layer": LAYER, "feature": "out"})
    plain_tokens = tiny.tokens(images)
    plain_seq = sequence_at(model, images, LAYER)
    plain_later = sequence_at(model, images, LAYER + 2)
    plain_out = model(images)

    wrapped = attach(tiny, head)  # a Backbone works; layer from the head's manifest
    assert wrapped.layer == LAYER and wrapped.num_prefix_tokens == 1
    corrected = wrapped.tokens(images)
    assert corrected.shape == plain_tokens.shape == (2, 4, 4, D)
    torch.testing.assert_close(corrected, head(plain_tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(corrected, plain_tokens, atol=1e-3)

    seen = {}
    handle = model.blocks[LAYER].register_forward_hook(lambda m, i, o: seen.setdefault("out", o.detach().clone()))
    try:
        out = wrapped(images)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["out"][:, :1], plain_seq[:, :1])  # class token untouched
    torch.testing.assert_close(seen["out"][:, 1:], head(plain_seq[:, 1:]), rtol=1e-5, atol=1e-5)

    # later blocks see the corrected tokens: run them by hand on the corrected sequence
    manual = torch.cat([plain_seq[:, :1], head(plain_seq[:, 1:])], dim=1)
    with torch.inference_mode():
        for blk in model.blocks[LAYER + 1: LAYER + 3]:
            manual = blk(manual)
    with torch.inference_mode():
        (later,) = model.forward_intermediates(images, indices=[LAYER + 2], output_fmt="NLC",
                                                intermediates_only=True, stop_early=True)
    torch.testing.assert_close(later, manual[:, 1:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(manual, plain_later, atol=1e-3)
    assert not torch.allclose(out, plain_out, atol=1e-4)

    assert wrapped.detach() is model
    torch.testing.assert_close(tiny.tokens(images), plain_tokens)
    torch.testing.assert_close(model(images), plain_out)


def test_attach_identity_head_changes_nothing(tiny, images):
    head = SOAPHead(torch.eye(D), {"layer": LAYER})
    with attach(tiny.model, head, layer=-7) as wrapped:  # negative layers count from the end
        assert wrapped.layer == 12 - 7
        torch.testing.assert_close(wrapped(images), tiny.model(images), rtol=1e-5, atol=1e-5)


def test_attach_rejects_mismatches(tiny):
    with pytest.raises(SoapError, match="D=384"):
        attach(tiny.model, SOAPHead(torch.eye(384), {"layer": 1}))
    with pytest.raises(SoapError, match="'k' features"):
        attach(tiny.model, SOAPHead(torch.eye(D), {"layer": 1, "feature": "k"}))
    with pytest.raises(SoapError, match="out of range"):
        attach(tiny.model, SOAPHead(torch.eye(D), {}), layer=12)
    with pytest.raises(SoapError, match="pass layer="):
        attach(tiny.model, SOAPHead(torch.eye(D), {}))


def test_load_head_from_registry_cached_and_verified(tiny, images, tmp_path, monkeypatch):
    monkeypatch.setenv("SOAPFLOW_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "reg"
    reg = Registry(root)
    art1, p1 = make_head_artifact(tmp_path / "a1", seed=1)
    art2, p2 = make_head_artifact(tmp_path / "a2", seed=2)
    reg.publish(art1)
    reg.publish(art2)
    name = f"vit_tiny_patch16_224/{LAYER}"
    reg.promote(name, 1, "production")

    head = load_head(f"{name}@production", registry=str(root))
    assert torch.equal(head.weight, torch.from_numpy(p1))
    assert head.manifest["name"] == name and head.manifest["version"] == 1
    cached = cache_root() / "heads" / "vit_tiny_patch16_224" / str(LAYER) / "1"
    assert (cached / "soap.safetensors").is_file()
    assert torch.equal(load_head(name, registry=reg).weight, torch.from_numpy(p2))  # latest = 2

    # a verified cache copy is reused without pulling again
    def no_pull(*a, **k):
        raise AssertionError("pulled again")

    monkeypatch.setattr(Registry, "pull", no_pull)
    assert torch.equal(load_head(f"{name}:1", registry=str(root)).weight, torch.from_numpy(p1))
    monkeypatch.undo()
    monkeypatch.setenv("SOAPFLOW_CACHE", str(tmp_path / "cache"))

    # a corrupted cache copy is replaced by a fresh, verified pull
    data = bytearray((cached / "soap.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (cached / "soap.safetensors").write_bytes(bytes(data))
    assert torch.equal(load_head(f"{name}:1", registry=str(root)).weight, torch.from_numpy(p1))

    # a corrupted registry copy is refused (on a fresh cache: a verified cached copy is still good)
    monkeypatch.setenv("SOAPFLOW_CACHE", str(tmp_path / "cache2"))
    reg_file = root / name / "~versions" / "2" / "artifact" / "soap.safetensors"
    data = bytearray(reg_file.read_bytes())
    data[-3] ^= 0xFF
    reg_file.write_bytes(bytes(data))
    with pytest.raises(SoapError, match=r"vit_tiny_patch16_224/5:2 file soap.safetensors"):
        load_head(f"{name}:2", registry=str(root), storage_options=None)
    with pytest.raises(SoapError, match="no alias 'staging'"):
        load_head(f"{name}@staging", registry=str(root))

    # attach straight from a ref
    plain = tiny.tokens(images)
    with attach(tiny, f"{name}@production", registry=str(root)) as wrapped:
        torch.testing.assert_close(wrapped.tokens(images), plain @ torch.from_numpy(p1).T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tiny.tokens(images), plain)


def test_attach_head_fitted_after_the_final_norm(images):
    """A head fitted on the last block's tokens after the final norm (the default) corrects
    forward_features' patch tokens; one that claims the norm at an earlier block is refused."""
    last = load_backbone("vit_tiny_patch16_224", weights="random", image_size=64)
    model = last.model
    assert last.final_norm_at() is True
    head = SOAPHead(torch.from_numpy(projector()), {"layer": 11, "feature": "out", "final_norm": True})
    with torch.inference_mode():
        plain = model.forward_features(images)
    plain_tokens = last.tokens(images)  # = forward_features' patch tokens
    torch.testing.assert_close(plain_tokens.reshape(2, 16, D), plain[:, 1:], rtol=1e-6, atol=1e-6)
    with attach(last, head) as wrapped:
        assert wrapped.after_norm
        torch.testing.assert_close(wrapped.tokens(images), head(plain_tokens), rtol=1e-5, atol=1e-5)
        with torch.inference_mode():
            full = model.forward_features(images)
        torch.testing.assert_close(full[:, :1], plain[:, :1])  # class token untouched
        torch.testing.assert_close(full[:, 1:], head(plain[:, 1:]), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_features(images), plain)  # detached
    with pytest.raises(SoapError, match="after the final norm"):
        attach(model, SOAPHead(torch.eye(D), {"layer": 4, "final_norm": True}))


def test_attach_refuses_a_second_head_on_the_same_model(tiny, images):
    head = SOAPHead(torch.from_numpy(projector()), {"layer": LAYER, "feature": "out"})
    with attach(tiny, head) as first:
        once = first.tokens(images)
        with pytest.raises(SoapError, match="already has a SOAP head attached at block 5.*project twice"):
            attach(tiny.model, head)
        torch.testing.assert_close(first.tokens(images), once)  # still projected once
    with attach(tiny, head) as again:  # after detach, attaching works again
        torch.testing.assert_close(again.tokens(images), once)


def test_attach_refuses_a_layer_the_head_was_not_fitted_on(tiny):
    head = SOAPHead(torch.eye(D), {"layer": 11, "feature": "out"})
    with pytest.raises(SoapError, match=r"fitted on block 11 \(its manifest\) but layer=6"):
        attach(tiny.model, head, layer=6)
    with pytest.warns(UserWarning, match="fitted on block 11"):
        attached = attach(tiny.model, head, layer=6, strict=False)
    assert attached.layer == 6
    attached.detach()
    with attach(tiny.model, head, layer=-1) as same:  # -1 is block 11 of 12: no mismatch
        assert same.layer == 11


def test_soap_head_takes_numpy_arrays_and_says_what_it_needs():
    p = projector()
    head = SOAPHead(torch.from_numpy(p), {})
    tokens = np.random.default_rng(0).normal(size=(2, 4, 4, D)).astype(np.float32)
    out = head(tokens)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == tokens.shape
    np.testing.assert_allclose(out, tokens @ p.T, rtol=1e-5, atol=1e-5)
    assert head(tokens.astype(np.float64)).dtype == np.float64
    with pytest.raises(TypeError, match=r"torch.Tensor or NumPy array of shape \(\.\.\., 192\)"):
        head(tokens.tolist())
    with pytest.raises(ValueError, match=r"\(\.\.\., 192\) \(D last\), got shape \(2, 192, 4\)"):
        head(torch.zeros(2, D, 4))
