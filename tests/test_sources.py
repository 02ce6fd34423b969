"""Image sources: folder pre-scan, mode conversion, transform, photos, fashion-mnist, noise."""

from __future__ import annotations

import gzip
import multiprocessing
import os
import pickle
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from soapflow import noise_generators as ng
from soapflow.errors import SoapError
from soapflow.sources import (
    FASHION_MNIST_DIR,
    ArraySource,
    OPENCV_DOC_DATA,
    chunk_loader,
    list_sources,
    load_rgb,
    open_source,
    transform_image,
    transform_mask,
)
from soapflow import transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RED = (200, 30, 90)
U16 = np.array([0, 1, 128, 129, 257, 1000, 25700, 32767, 32768, 40000, 65280, 65534, 65535], np.uint16)


def write_bomb_png(path, w=20000, h=20000):
    """A valid 1-bit greyscale PNG of w x h pixels, all black: ~50 KB on disk, 400 Mpx decoded."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (w + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    block = row * 1000
    idat = b"".join(comp.compress(block) for _ in range(h // 1000)) + comp.compress(row * (h % 1000)) + comp.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", idat))
        f.write(chunk(b"IEND", b""))


USABLE = [
    "a_red.png",
    "b.jpg",
    "c.webp",
    "cmyk.jpg",
    "d.bmp",
    "e.tiff",
    "gray16.png",
    "la.png",
    "palette.png",
    "rgba.png",
    "sub/deeper/f.JPEG",
    "sub/nested.PNG",
]
SKIPPED = {"bomb.png", "corrupt.jpg", "text.png", "truncated.png", "zero.jpg"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 30), RED).save(root / "a_red.png")
    grad = np.stack(np.meshgrid(np.arange(80), np.arange(60)), -1)
    rgb = np.concatenate([grad * 3, grad[..., :1]], -1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "b.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(root / "c.webp", lossless=True)
    Image.new("RGB", (30, 40), (1, 2, 3)).save(root / "d.bmp")
    Image.new("RGB", (33, 33), (9, 99, 199)).save(root / "e.tiff")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(root / "sub" / "nested.PNG")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(root / "sub" / "deeper" / "f.JPEG")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)
    Image.fromarray(U16.reshape(1, -1)).save(root / "gray16.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    pal.paste(1, (8, 0, 16, 16))
    pal.save(root / "palette.png")
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # opaque red
    rgba[:, 10:] = (0, 0, 255, 0)  # fully transparent blue
    rgba[0, 15] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba).save(root / "rgba.png")
    la = np.zeros((8, 8, 2), np.uint8)
    la[:, :4] = (50, 255)
    assert Image.fromarray(la).mode == "LA"
    Image.fromarray(la).save(root / "la.png")
    (root / "zero.jpg").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    noise_png = root / "_tmp_noise.bin"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise_png, format="PNG")
    data = noise_png.read_bytes()
    noise_png.unlink()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "text.png").write_text("this is not a png\n" * 10)
    (root / "notes.txt").write_text("ignored")
    write_bomb_png(root / "bomb.png")
    return root


@pytest.fixture(scope="module")
def src(folder):
    return open_source(str(folder))


# ------------------------------------------------------------------- folder scan


def test_folder_usable_skipped_and_order(src, folder):
    assert src.kind == "files"
    assert len(src) == len(USABLE)
    assert src.relpaths == USABLE  # sorted by relative path, nested, case-insensitive extensions
    assert src.paths == [str(folder / p) for p in USABLE]
    skipped = {os.path.basename(s["path"]): s["reason"] for s in src.skipped}
    assert set(skipped) == SKIPPED  # notes.txt is ignored, not skipped
    assert "0 bytes" in skipped["zero.jpg"]
    assert "not a recognised image" in skipped["corrupt.jpg"]
    assert "not a recognised image" in skipped["text.png"]
    assert "truncated" in skipped["truncated.png"]
    assert "decompression bomb" in skipped["bomb.png"] and "400000000" in skipped["bomb.png"]
    fp = src.fingerprint
    assert fp["count"] == len(USABLE) and fp["skipped"] == len(SKIPPED) and fp["root"] == str(folder)
    assert fp["candidates"] == len(USABLE) + len(SKIPPED)


def test_bomb_guard_holds_without_pillow_limit(folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    reason = transforms.check_image(str(folder / "bomb.png"))
    assert reason and "decompression bomb" in reason
    with pytest.raises(transforms.ImageRejected):
        load_rgb(folder / "bomb.png")


def test_first_n_usable(folder):
    s = open_source(folder, n=3)  # a Path works too
    assert s.relpaths == USABLE[:3]
    assert [os.path.basename(x["path"]) for x in s.skipped] == ["bomb.png"]  # between b.jpg and c.webp
    big = open_source(str(folder), n=100)
    assert len(big) == len(USABLE)
    assert "only 12 usable" in big.fingerprint["note"]
    with pytest.raises(SoapError):
        open_source(str(folder), n=0)


# ------------------------------------------------------------------- conversion


def test_mode_conversions(folder):
    g16 = np.asarray(load_rgb(folder / "gray16.png"))
    assert g16.dtype == np.uint8 and g16.shape == (1, len(U16), 3)
    expected = np.floor(U16 / 257.0 + 0.5).astype(np.uint8)  # scaled, not clipped
    assert (g16[0, :, 0] == expected).all() and (g16[..., 0] == g16[..., 2]).all()
    assert list(g16[0, [0, 4, 5, 6, -1], 0]) == [0, 1, 4, 100, 255]

    cmyk = np.asarray(load_rgb(folder / "cmyk.jpg")).astype(int)
    assert np.abs(cmyk[16, 16] - [255, 0, 0]).max() <= 8

    pal = np.asarray(load_rgb(folder / "palette.png"))
    assert tuple(pal[0, 0]) == (0, 0, 0) and tuple(pal[0, 15]) == (10, 200, 30)

    rgba = load_rgb(folder / "rgba.png")
    a = np.asarray(rgba)
    assert rgba.mode == "RGB"
    assert tuple(a[5, 2]) == (255, 0, 0)  # opaque kept
    assert tuple(a[5, 15]) == (255, 255, 255)  # transparent -> white
    assert np.abs(a[0, 15].astype(int) - 127).max() <= 1  # half black over white

    la = np.asarray(load_rgb(folder / "la.png"))
    assert tuple(la[0, 0]) == (50, 50, 50) and tuple(la[0, 7]) == (255, 255, 255)


def test_gz_and_exif(tmp_path, folder):
    gz = tmp_path / "x.png.gz"
    gz.write_bytes(gzip.compress((folder / "c.webp").read_bytes()))
    assert np.array_equal(np.asarray(load_rgb(gz)), np.asarray(load_rgb(folder / "c.webp")))
    im = Image.new("RGB", (40, 20), (5, 5, 5))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (20, 40)


# -------------------------------------------------------------------- transform


@pytest.mark.parametrize("size", [16, 64])
def test_constant_color_normalization(size):
    x = transform_image(Image.new("RGB", (40, 30), RED), size, MEAN, STD)
    assert x.dtype == torch.float32 and x.shape == (3, size, size)
    want = (torch.tensor(RED, dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x, want.view(3, 1, 1).expand_as(x), atol=1e-6, rtol=0)


def test_matches_torchvision_resize_center_crop():
    T = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(1)
    for w, h in [(97, 61), (61, 97), (50, 50), (300, 17)]:
        pil = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = T.Compose(
            [
                T.Resize(24, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(24),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )(pil)
        assert torch.allclose(transform_image(pil, 24, MEAN, STD), ref, atol=1e-6)


def test_mask_aligned_with_image():
    w, h = 90, 50
    m = np.zeros((h, w), bool)
    m[10:35, 40:75] = True  # off-center rectangle: catches flips and crop offsets
    img = Image.fromarray(np.repeat(m[..., None] * 255, 3, -1).astype(np.uint8))
    for size in (20, 37, 100):
        tm = transform_mask(m, size)
        assert tm.dtype == bool and tm.shape == (size, size)
        bright = transform_image(img, size, (0, 0, 0), (1, 1, 1), "bilinear")[0].numpy() > 0.5
        assert (tm == bright).mean() > 0.97
        assert tm.any() and not tm.all()
    assert np.array_equal(transform_mask(Image.fromarray(m), 37), transform_mask(m, 37))
    with pytest.raises(SoapError, match="interpolation"):
        transform_image(img, 8, MEAN, STD, "cubic-ish")


# -------------------------------------------------------- dataset and the loader


def test_dataset_pickle_and_workers(src):
    ds = src.dataset(32, MEAN, STD)
    ds2 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(ds[0], ds2[0])
    chunks = [range(0, 5), range(5, 5), range(5, 12)]
    ref = src.batch(range(12), 32, MEAN, STD)
    assert ref.shape == (12, 3, 32, 32)
    assert torch.equal(src.batch([3, 1], 32, MEAN, STD), ref[[3, 1]])
    for workers in (0, 2):
        got = list(chunk_loader(src, chunks, 32, MEAN, STD, workers))
        assert [ci for ci, _ in got] == [0, 1, 2]
        assert got[1][1].shape == (0, 3, 32, 32)
        assert torch.equal(torch.cat([t for _, t in got]), ref)
    assert src.mask(0, 32) is None
    with pytest.raises(IndexError):
        src.batch([12], 32, MEAN, STD)


def test_decode_failure_after_scan_names_file(tmp_path, folder):
    shutil.copy(folder / "a_red.png", tmp_path / "a.png")
    shutil.copy(folder / "b.jpg", tmp_path / "b.jpg")
    s = open_source(str(tmp_path))
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    for workers in (0, 2):
        with pytest.raises(SoapError, match="b.jpg") as e:
            list(chunk_loader(s, [range(0, 2)], 16, MEAN, STD, workers))
        assert "\n" not in str(e.value)  # the worker traceback is not pasted into the message
        assert not multiprocessing.active_children()  # workers were shut down despite the error


def test_fingerprint_tracks_size(tmp_path, folder):
    shutil.copy(folder / "a_red.png", tmp_path / "a.png")
    shutil.copy(folder / "c.webp", tmp_path / "c.webp")
    fp1 = open_source(str(tmp_path)).fingerprint
    assert open_source(str(tmp_path)).fingerprint == fp1
    with open(tmp_path / "a.png", "ab") as f:
        f.write(b"\0" * 10)  # trailing bytes: still a valid PNG, different size
    fp2 = open_source(str(tmp_path)).fingerprint
    assert fp2["count"] == 2 and fp2["sha256"] != fp1["sha256"]


def test_folder_errors(tmp_path, folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SoapError, match="empty"):
        open_source(str(empty))
    noimg = tmp_path / "noimg"
    noimg.mkdir()
    (noimg / "readme.txt").write_text("x")
    with pytest.raises(SoapError, match="no image files") as e:
        open_source(str(noimg))
    assert str(noimg) in str(e.value)
    with pytest.raises(SoapError, match="does not exist") as e:
        open_source(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(folder / "corrupt.jpg", bad / "x.jpg")
    with pytest.raises(SoapError, match="no usable images"):
        open_source(str(bad))
    with pytest.raises(SoapError, match="not a folder"):
        open_source(str(folder / "a_red.png"))
    with pytest.raises(SoapError, match="split"):
        open_source(str(folder), split="train")
    assert issubclass(SoapError, ValueError)


# ---------------------------------------------------------------------- photos


def test_photos_offline():
    p = open_source("photos")
    fp = p.fingerprint
    assert len(p) >= 8 and p.skipped == []
    assert fp["origins"]["scikit-image"] >= 6 and fp["origins"]["scikit-learn"] == 2
    assert p.relpaths[0].startswith("scikit-image/")
    assert "scikit-image/astronaut.png" in p.relpaths and "scikit-learn/china.jpg" in p.relpaths
    if os.path.isdir(OPENCV_DOC_DATA):
        assert fp["origins"]["opencv-doc"] >= 20
        assert not any("logo" in r.lower() for r in p.relpaths)
    x = p.batch(range(len(p)), 32, MEAN, STD)
    assert x.shape == (len(p), 3, 32, 32) and torch.isfinite(x).all()
    assert open_source("photos", n=5).relpaths == p.relpaths[:5]
    assert list_sources()[0]["spec"] == "photos"


def test_photos_without_opencv_doc_and_gz(monkeypatch, tmp_path, folder):
    import soapflow.sources.photos as photos

    monkeypatch.setattr(photos, "OPENCV_DOC_DATA", str(tmp_path / "absent"))
    base = open_source("photos")
    assert base.fingerprint["origins"]["opencv-doc"] == 0 and len(base) >= 8
    fake = tmp_path / "opencv"
    fake.mkdir()
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (80, 96, 3), dtype=np.uint8))
    buf = fake / "apple.jpg"
    photo.save(buf)
    (fake / "apple.jpg.gz").write_bytes(gzip.compress(buf.read_bytes()))
    buf.unlink()
    photo.save(fake / "LinuxLogo.jpg")  # known non-photo
    photo.save(fake / "left01.jpg")  # calibration series
    Image.new("RGB", (32, 32)).save(fake / "icon.png")  # tiny icon
    (fake / "notes.txt").write_text("x")
    monkeypatch.setattr(photos, "OPENCV_DOC_DATA", str(fake))
    p = open_source("photos")
    assert p.relpaths[len(base) :] == ["opencv-doc/apple.jpg"]
    assert p.relpaths[: len(base)] == base.relpaths
    assert p.batch([len(p) - 1], 16, MEAN, STD).shape == (1, 3, 16, 16)


# --------------------------------------------------------------- fashion-mnist


needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist"
)


@needs_fmnist
def test_fashion_mnist():
    fm = open_source("fashion-mnist")
    assert fm.spec == "fashion-mnist:test" and fm.kind == "files" and fm.paths is None
    assert len(fm) == 10000 and fm.labels.shape == (10000,)
    assert fm.labels.min() == 0 and fm.labels.max() == 9
    assert np.bincount(fm.labels).tolist() == [1000] * 10
    fp = fm.fingerprint
    assert fp["split"] == "test" and len(fp["images_sha256"]) == 64
    m28 = fm.mask(0, 28)
    assert m28.dtype == bool and np.array_equal(m28, fm.images[0] > 0)
    assert 0 < m28.mean() < 1
    m56 = fm.mask(0, 56)
    assert np.array_equal(m56[::2, ::2], m28)
    x = fm.batch([0, 1], 56, MEAN, STD)
    assert x.shape == (2, 3, 56, 56)
    # Background (mask False) is black in the image too.
    bg = (torch.zeros(3) - torch.tensor(MEAN)) / torch.tensor(STD)
    img0 = fm.batch([0], 28, MEAN, STD)[0]
    assert torch.allclose(img0[:, ~torch.from_numpy(m28)], bg.view(3, 1).expand(3, int((~m28).sum())))
    tr = open_source("fashion-mnist:train", n=100)
    assert len(tr) == 100 and tr.fingerprint["split"] == "train" and tr.fingerprint["total_in_split"] == 60000
    assert open_source("fashion-mnist", split="train", n=3).labels.tolist() == tr.labels[:3].tolist()
    with pytest.raises(SoapError, match="conflicting"):
        open_source("fashion-mnist:train", split="test")
    with pytest.raises(SoapError):
        open_source("fashion-mnist:valid")
    ds = pickle.loads(pickle.dumps(tr.dataset(28, MEAN, STD)))
    assert torch.equal(ds[3], tr.batch([3], 28, MEAN, STD)[0])


def test_fashion_mnist_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("SOAP_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(SoapError, match="apt-get install dataset-fashion-mnist"):
        open_source("fashion-mnist")


# ----------------------------------------------------------------------- noise


def test_noise_source():
    s = open_source("noise:mixture", n=10, seed=7)
    assert s.kind == "noise" and len(s) == 10 and s.skipped == [] and s.paths is None
    fp = s.fingerprint
    assert fp["generator"] == "mixture" and fp["seed"] == 7 and fp["params"] == ng.generator_params("mixture")
    ref = ng.generate("mixture", 2, 24, seed=7, start=5, mean=MEAN, std=STD)
    assert torch.equal(s.batch([5, 6], 24, MEAN, STD), ref)
    assert torch.equal(s.batch([6, 5], 24, MEAN, STD), ref[[1, 0]])
    assert torch.equal(s.batch([6, 5, 6], 24, MEAN, STD), ref[[1, 0, 1]])
    # Generated alone, image 6 may differ from its batched self in the last float bit
    # (noise_generators is not bitwise batch-invariant for every generator).
    assert torch.allclose(s.dataset(24, MEAN, STD)[6], ref[1], atol=1e-5, rtol=0)
    got = dict(chunk_loader(s, [range(0, 5), range(5, 7)], 24, MEAN, STD, 2))
    assert torch.equal(got[1], ref)
    other = open_source("noise:pink?alpha=2", n=3, seed=7)
    assert other.fingerprint["params"]["alpha"] == 2.0
    assert torch.equal(other.batch([1], 16, MEAN, STD), ng.generate("pink", 1, 16, seed=7, start=1, alpha=2.0))
    with pytest.raises(SoapError, match="needs n"):
        open_source("noise:pink")
    with pytest.raises(SoapError):
        open_source("noise:no-such-generator", n=2)


# --------------------------------------------------- decoding on the device (GPU path)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """Photo JPEGs bigger and smaller than the output size, grey, CMYK and EXIF-rotated ones,
    and a PNG: the last three take the Pillow path in the workers."""
    skdata = pytest.importorskip("skimage.data")
    d = tmp_path_factory.mktemp("jpegs")
    photo = Image.fromarray(skdata.astronaut())  # 512 x 512
    photo.resize((640, 427)).save(d / "a_landscape.jpg", quality=90)
    photo.resize((150, 200)).save(d / "b_small_portrait.jpg", quality=90)
    photo.convert("L").save(d / "c_grey.jpg", quality=90)
    photo.convert("CMYK").save(d / "d_cmyk.jpg", quality=90)
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.resize((300, 200)).save(d / "e_rotated.jpg", exif=exif, quality=90)
    photo.resize((200, 260)).save(d / "f.png")
    return d


def test_device_decode_matches_pillow(jpeg_folder):
    src = open_source(str(jpeg_folder))
    assert [os.path.basename(p) for p in src.paths][:2] == ["a_landscape.jpg", "b_small_portrait.jpg"]
    chunks = [range(0, 4), range(4, 4), range(4, 6)]
    ref = torch.cat([x for _, x in chunk_loader(src, chunks, 224, MEAN, STD)])
    for workers in (0, 1):
        got = list(chunk_loader(src, chunks, 224, MEAN, STD, workers, device_decode=True, device="cpu"))
        assert [ci for ci, _ in got] == [0, 1, 2] and got[1][1].shape == (0, 3, 224, 224)
        x = torch.cat([t for _, t in got])
        assert x.shape == ref.shape == (6, 3, 224, 224) and x.dtype == torch.float32
        grey_levels = ((x - ref) * torch.tensor(STD).view(3, 1, 1) * 255).abs()
        assert torch.equal(x[3:], ref[3:])  # CMYK, EXIF-rotated and PNG: decoded by Pillow in the workers
        # plain JPEGs: the same libjpeg-turbo decode (bit-identical without a resize, measured), then
        # torch's antialiased resize instead of Pillow's: within a grey level or two, more when enlarging
        for k in range(3):
            g = grey_levels[k]
            assert g.mean() < 0.25 and (g > 2.5).float().mean() < 1e-3 and g.max() <= 12, (k, g.mean(), g.max())
        assert not torch.equal(x[:3], ref[:3])  # it really is the other decoder


def test_transform_pixels_batch_matches_single_images():
    imgs = torch.randint(0, 256, (3, 3, 90, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for interpolation in transforms.TENSOR_INTERPOLATIONS:
        batch = transforms.transform_pixels(imgs, 64, MEAN, STD, interpolation)
        assert batch.shape == (3, 3, 64, 64)
        for k in range(3):
            assert torch.equal(batch[k], transforms.transform_pixels(imgs[k], 64, MEAN, STD, interpolation))
    with pytest.raises(SoapError, match=r"\(3, H, W\) or \(B, 3, H, W\) RGB pixels, got \(3, 2, 90, 120\)"):
        transforms.transform_pixels(imgs[:, :2], 64, MEAN, STD)


def test_device_decode_groups_images_by_size(jpeg_folder, tmp_path):
    # a chunk's JPEGs of one size are resized as one batch; each must still land in its own place
    photo = Image.open(jpeg_folder / "a_landscape.jpg")
    photo.save(tmp_path / "1.jpg", quality=90)
    photo.resize((150, 200)).save(tmp_path / "2.jpg", quality=90)
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "3.jpg", quality=90)
    photo.resize((150, 200)).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(tmp_path / "4.jpg", quality=90)
    src = open_source(str(tmp_path))
    (_, together), = chunk_loader(src, [range(4)], 96, MEAN, STD, device_decode=True)
    alone = torch.cat([x for _, x in chunk_loader(src, [range(k, k + 1) for k in range(4)], 96, MEAN, STD,
                                                  device_decode=True)])
    assert torch.equal(together, alone)
    assert not torch.equal(together[0], together[2]) and not torch.equal(together[1], together[3])


def test_device_decode_errors(jpeg_folder, tmp_path):
    shutil.copy(jpeg_folder / "a_landscape.jpg", tmp_path / "a.jpg")
    shutil.copy(jpeg_folder / "b_small_portrait.jpg", tmp_path / "b.jpg")
    s = open_source(str(tmp_path))
    data = (tmp_path / "b.jpg").read_bytes()
    # still a JPEG header, then the entropy-coded data is garbage
    (tmp_path / "b.jpg").write_bytes(data[: data.index(b"\xff\xda") + 20] + bytes(range(256)) * 20)
    with pytest.raises(SoapError, match=r"could not decode .*b\.jpg on cpu"):
        list(chunk_loader(s, [range(0, 2)], 32, MEAN, STD, device_decode=True, device="cpu"))
    (tmp_path / "b.jpg").write_bytes(b"garbage")  # not a JPEG any more: the Pillow path names it
    with pytest.raises(SoapError, match=r"b\.jpg"):
        list(chunk_loader(s, [range(0, 2)], 32, MEAN, STD, device_decode=True, device="cpu"))
    with pytest.raises(SoapError, match="not 'lanczos'"):
        list(chunk_loader(s, [range(0, 1)], 32, MEAN, STD, interpolation="lanczos", device_decode=True))
    with pytest.raises(SoapError, match="no image files"):
        list(chunk_loader(ArraySource("arrays", np.zeros((2, 28, 28), np.uint8), None, {}), [range(0, 2)], 32, MEAN,
                          STD, device_decode=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_decode_matches_cpu_decode(jpeg_folder):
    src = open_source(str(jpeg_folder))
    cpu = torch.cat([x for _, x in chunk_loader(src, [range(6)], 224, MEAN, STD, device_decode=True)])
    (_, gpu), = chunk_loader(src, [range(6)], 224, MEAN, STD, 1, device="cuda")  # on by default on CUDA
    assert gpu.device.type == "cuda"
    grey_levels = ((gpu.cpu() - cpu) * torch.tensor(STD).view(3, 1, 1) * 255).abs()
    assert torch.equal(gpu.cpu()[3:], cpu[3:])  # decoded by Pillow in the workers either way
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's: on an H100 (torchvision 0.26)
    # its three images were 0.49 grey levels apart on average, 2.2 % of values by more than 4.5
    g = grey_levels[:3]
    assert g.mean() < 1 and (g > 4.5).float().mean() < 0.05, (g.mean(), (g > 4.5).float().mean())
