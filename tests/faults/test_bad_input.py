"""Bad input through the CLI: each case ends in one clear line on stderr and exit code 2, or
(for unreadable images in a folder) a counted, listed skip — never a traceback, never silence.

The command lines run in processes forked by ``tests.faults.clidriver`` (imports paid once);
two of them are also run as plain ``soap`` subprocesses to show the driver changes nothing.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.faults.helpers import BACKBONE, ENV, REPO, assert_clean_error, bomb_png, png_bytes, soap, stderr_lines

SUMMARY: dict[str, str] = {}


# ----------------------------------------------------------------------------- inputs


def _image_folders(root: Path) -> dict[str, Path]:
    from PIL import Image

    from tests.faults.helpers import make_images

    mixed = make_images(root / "mixed", 4)
    good = (mixed / "img0001.png").read_bytes()
    jpeg = (mixed / "img0000.jpg").read_bytes()
    (mixed / "corrupt.jpg").write_bytes(jpeg[:20] + b"\x00garbage" * 40)
    (mixed / "zero.png").write_bytes(b"")
    (mixed / "truncated.png").write_bytes(good[: len(good) // 2])
    (mixed / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (mixed / "bomb.png").write_bytes(bomb_png(20000, 20000))
    (mixed / "bomb100m.png").write_bytes(bomb_png(10000, 10000))  # past our limit, under twice Pillow's
    buf = io.BytesIO()
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(buf, "JPEG")
    (mixed / "cmyk.jpg").write_bytes(buf.getvalue())
    gray16 = Image.fromarray((np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40))
    gray16.save(mixed / "gray16.png")
    (mixed / "palette.png").write_bytes(png_bytes("P", (40, 40)))
    (mixed / "rgba.png").write_bytes(png_bytes("RGBA", (40, 40)))
    (mixed / "la.png").write_bytes(png_bytes("LA", (40, 40)))
    (mixed / "bitonal.png").write_bytes(png_bytes("1", (40, 40)))

    allbad = root / "allbad"
    allbad.mkdir()
    (allbad / "zero.png").write_bytes(b"")
    (allbad / "corrupt.jpg").write_bytes(jpeg[:20] + b"\x00garbage" * 40)
    (allbad / "bomb.png").write_bytes(bomb_png(20000, 20000))
    empty = root / "empty"
    empty.mkdir()
    noimages = root / "noimages"
    noimages.mkdir()
    (noimages / "notes.txt").write_text("no pictures here")
    (noimages / "data.csv").write_text("a,b\n1,2\n")
    return {"mixed": mixed, "allbad": allbad, "empty": empty, "noimages": noimages}


def _weights(root: Path) -> dict[str, Path]:
    import timm
    import torch
    from safetensors.torch import save_file

    other = timm.create_model("test_vit", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(root / "test_vit.safetensors"))
    (root / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)

    class Evil:
        def __reduce__(self):
            return (open, (str(root / "PWNED"), "w"))

    torch.save({"state_dict": Evil()}, root / "evil.pt")
    return {"other_arch": root / "test_vit.safetensors", "garbage": root / "garbage.safetensors",
            "pickle": root / "evil.pt"}


def _stores(root: Path) -> dict[str, Path]:
    import zarr

    from storehelp import positional_tokens, write_store
    from soapflow.storage.feature_store import FeatureStore

    s = {}
    real = positional_tokens(12, h=2, w=2, d=8, seed=1)
    synth = positional_tokens(12, h=2, w=2, d=8, seed=2)
    write_store(root / "real", real, chunk=4)
    write_store(root / "synth", synth, chunk=4)
    write_store(root / "dim16", positional_tokens(12, h=2, w=2, d=16, seed=2), chunk=4)
    write_store(root / "grid3", positional_tokens(12, h=3, w=3, d=8, seed=2), chunk=4)
    write_store(root / "otherbackbone", synth, chunk=4, attrs={"backbone": "another-vit"})
    write_store(root / "otherlayer", synth, chunk=4, attrs={"layer": 7})
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        store = write_store(root / name, synth, chunk=4)
        block = np.asarray(store.tokens[5:6])
        block[0, 1, 0, 3] = value
        store.tokens[5:6] = block  # written by "another tool", after the writer's own checks
    part = FeatureStore.create(str(root / "incomplete"), count=12, grid=(2, 2), dim=8, chunk=4, dtype="float32",
                               attrs={"backbone": "test-vit", "layer": 3})
    part.write_chunk(0, synth[:4])
    zarr.create_array(str(root / "array"), shape=(12, 2, 2, 8), dtype="float32")
    (root / "corruptmeta").mkdir()
    (root / "corruptmeta" / "zarr.json").write_text("{not json")
    (root / "plainfile").write_text("not a store")
    s.update({k: root / k for k in ("real", "synth", "dim16", "grid3", "otherbackbone", "otherlayer", "nan", "inf",
                                    "incomplete", "array", "corruptmeta", "plainfile")})
    return s


def _artifacts(root: Path) -> dict[str, Path]:
    from soapflow.storage.artifact import TENSOR_NAMES, write_artifact

    rng = np.random.default_rng(0)
    tensors = {k: rng.normal(size=(4, 4)).astype(np.float32) for k in TENSOR_NAMES}
    good = write_artifact(root / "good", tensors, {"backbone": "test-vit", "layer": 3})
    tampered = write_artifact(root / "tampered", tensors, {"backbone": "test-vit", "layer": 3})
    data = bytearray((tampered / "soap.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "soap.safetensors").write_bytes(bytes(data))
    badjson = write_artifact(root / "badjson", tensors, {"backbone": "test-vit", "layer": 3})
    (badjson / "manifest.json").write_text("{oops")
    notdict = write_artifact(root / "notdict", tensors, {"backbone": "test-vit", "layer": 3})
    (notdict / "manifest.json").write_text("[1, 2, 3]")
    return {"good": good, "tampered": tampered, "badjson": badjson, "notdict": notdict}


# ----------------------------------------------------------------------------- cases


def _cases(root: Path, f, w, s, a) -> list[dict]:
    reg = root / "registry"
    reg.mkdir()  # (an existing, empty registry: a root that is not there is an error of its own)
    out = lambda name: str(root / "out" / name)  # noqa: E731
    ext = lambda *args: ["extract", *BACKBONE, *map(str, args)]  # noqa: E731
    fit = lambda real, synth, *args: ["fit", str(s[real]), str(s[synth]), "--out", out(f"fit-{real}-{synth}"),  # noqa: E731
                                      "--no-plots", *map(str, args)]
    notstore = root / "out" / "my-photos"
    notstore.mkdir(parents=True)
    (notstore / "holiday.jpg").write_bytes(b"precious")
    outfile = root / "out" / "a-file"
    outfile.write_text("x")
    existing_art = root / "out" / "existing-artifact"
    existing_art.mkdir()
    (existing_art / "keep.txt").write_text("x")
    C = []

    def case(id, argv, *fragments, ok=False):
        C.append({"id": id, "argv": [str(x) for x in argv], "fragments": list(fragments), "ok": ok})

    # images (counted skips) and folders
    case("folder with corrupt / zero-byte / truncated / CMYK / 16-bit / palette / alpha / 1-bit / 20000x20000 images",
         ext("--source", f["mixed"], "--chunk", 4, "--out", out("mixed")), ok=True)
    case("folder whose images are all unreadable", ext("--source", f["allbad"], "--out", out("allbad")),
         "no usable images", "3 image files were skipped")
    case("empty folder", ext("--source", f["empty"], "--out", out("empty")), "is empty")
    case("folder with no images", ext("--source", f["noimages"], "--out", out("noimages")), "contains no image files")
    case("folder that does not exist", ext("--source", root / "nowhere", "--out", out("nowhere")), "does not exist")
    case("a file given as the image folder", ext("--source", f["mixed"] / "img0001.png", "--out", out("file")),
         "is not a folder")
    case("unknown noise generator", ext("--source", "noise:nope", "--n", 4, "--out", out("nope")), "nope")
    case("bad noise parameter", ext("--source", "noise:pink?alpha", "--n", 4, "--out", out("nope2")), "alpha")
    case("noise without --n", ext("--source", "noise:pink", "--out", out("non")), "needs n")
    case("--n 0", ext("--source", "noise:pink", "--n", 0, "--out", out("n0")), "--n must be ≥ 1, got 0")
    # backbones
    case("unknown backbone name", ["extract", "--backbone", "vit_nonexistent_9000", "--weights", "random",
                                   "--source", "noise:pink", "--n", 4, "--out", out("bb")], "vit_nonexistent_9000")
    case("weights for another architecture", ["extract", "--backbone", "vit_tiny_patch16_224", "--weights",
                                              w["other_arch"], "--image-size", 32, "--source", "noise:pink", "--n", 4,
                                              "--out", out("w1")], "do not fit the architecture")
    case("weights file that is not safetensors", ["extract", "--backbone", "vit_tiny_patch16_224", "--weights",
                                                  w["garbage"], "--image-size", 32, "--source", "noise:pink", "--n", 4,
                                                  "--out", out("w2")], "cannot read safetensors weights")
    case("weights pickle that would run code when unpickled", ["extract", "--backbone", "vit_tiny_patch16_224",
                                                               "--weights", w["pickle"], "--image-size", 32, "--source",
                                                               "noise:pink", "--n", 4, "--out", out("w3")],
         "pickled objects are refused")
    case("weights file that does not exist", ["extract", "--backbone", "vit_tiny_patch16_224", "--weights",
                                              root / "none.safetensors", "--source", "noise:pink", "--n", 4,
                                              "--out", out("w4")], "weights file not found")
    case("layer index out of range (12 of 12 blocks)", ext("--layer", 12, "--source", "noise:pink", "--n", 4,
                                                           "--out", out("l12")), "layer 12 is out of range")
    case("negative layer index out of range (-13)", ext("--layer", -13, "--source", "noise:pink", "--n", 4,
                                                        "--out", out("l13")), "layer -13 is out of range")
    case("image size not divisible by the patch size", ["extract", "--backbone", "vit_tiny_patch16_224",
                                                        "--weights", "random", "--image-size", 30, "--source",
                                                        "noise:pink", "--n", 4, "--out", out("is30")],
         "not a multiple of", "patch size 16")
    case("image size 0", ["extract", "--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", 0,
                          "--source", "noise:pink", "--n", 4, "--out", out("is0")], "--image-size must be ≥ 1, got 0")
    case("unknown feature", ext("--feature", "xyz", "--source", "noise:pink", "--n", 4, "--out", out("feat")),
         "unknown feature")
    case("CUDA device on a machine without one", ext("--device", "cuda", "--source", "noise:pink", "--n", 4,
                                                    "--out", out("cuda")), "cannot use device")
    case("--chunk 0", ext("--source", "noise:pink", "--n", 4, "--chunk", 0, "--out", out("c0")), "--chunk must be ≥ 1, got 0")
    case("--dtype bfloat16", ext("--source", "noise:pink", "--n", 4, "--dtype", "bfloat16", "--out", out("bf")),
         "bfloat16", "not supported")
    # output locations
    case("--out is an existing folder that is not a store (it must not be wiped)",
         ext("--source", "noise:pink", "--n", 4, "--out", notstore), str(notstore), "refusing to overwrite")
    case("--out is a file", ext("--source", "noise:pink", "--n", 4, "--out", outfile), str(outfile), "is a file")
    case("--out is a store of another dataset", ext("--source", "noise:pink", "--n", 4, "--out", s["real"]),
         str(s["real"]), "exists with")
    # fit: stores
    case("stores with mismatched D", fit("real", "dim16"), "token dim D", str(s["real"]), str(s["dim16"]), "8", "16")
    case("stores with mismatched grid", fit("real", "grid3"), "grid", "[2, 2]", "[3, 3]")
    case("stores with mismatched backbone", fit("real", "otherbackbone"), "backbone", "test-vit", "another-vit")
    case("stores with mismatched layer", fit("real", "otherlayer"), "layer", "3", "7")
    case("NaN tokens", fit("real", "nan"), str(s["nan"]), "NaN/Inf tokens in chunk 1", "first at image 5")
    case("Inf tokens", fit("real", "inf"), str(s["inf"]), "NaN/Inf tokens in chunk 1")
    case("incomplete store", fit("real", "incomplete"), str(s["incomplete"]), "incomplete", "2 of 3 chunks")
    case("store path that does not exist", ["fit", str(root / "nostore"), str(s["synth"]), "--out", out("f0")],
         "no zarr v3 group")
    case("store that is a single zarr array", fit("array", "synth"), "single zarr array")
    case("store whose zarr.json is corrupt", fit("corruptmeta", "synth"), "cannot read its zarr metadata")
    case("store that is a plain file", fit("plainfile", "synth"), str(s["plainfile"]))
    case("fit --out is a file", ["fit", str(s["real"]), str(s["synth"]), "--out", outfile], "is a file")
    case("fit --out exists and is not empty", ["fit", str(s["real"]), str(s["synth"]), "--out", existing_art],
         "already exists")
    # fit: parameters
    case("μ < 0", fit("real", "synth", "--mu=-1"), "--mu must be ≥ 0")
    case("μ not a number", fit("real", "synth", "--mu", "lots"), "--mu must be a number")
    case("μ = NaN", fit("real", "synth", "--mu", "nan"), "--mu must be ≥ 0")
    case("τ = 0", fit("real", "synth", "--tau", 0), "--tau must be > 0")
    case("τ < 0", fit("real", "synth", "--tau=-0.5"), "--tau must be > 0")
    case("τ = NaN", fit("real", "synth", "--tau", "nan"), "--tau must be > 0")
    case("γ = 0", fit("real", "synth", "--gamma", 0), "--gamma must be > 0")
    case("refit μ < 0", ["refit", *BACKBONE, "--mu=-2", "--workdir", out("rf")], "--mu must be ≥ 0")
    case("refit τ = 0", ["refit", *BACKBONE, "--tau", 0, "--workdir", out("rf")], "--tau must be > 0")
    # artifacts and the registry
    case("manifest whose hash does not match the tensors", ["registry", "publish", a["tampered"], "--name", "m",
                                                            "--registry", reg], "does not match")
    case("manifest that is not JSON", ["registry", "publish", a["badjson"], "--name", "m", "--registry", reg],
         "not valid JSON")
    case("manifest that is not a JSON object", ["registry", "publish", a["notdict"], "--name", "m",
                                                "--registry", reg], "must hold a JSON object")
    for i, name in enumerate(["../evil", "a/../../evil", "/abs/evil", "ok/./x", "a\\..\\evil", "~versions/x", ""]):
        case(f"registry name with path traversal: {name!r}", ["registry", "publish", a["good"], "--name", name,
                                                              "--registry", reg], "registry name")
    case("registry pull of an unknown name", ["registry", "pull", "nope/x", "--to", out("pull"), "--registry", reg],
         "no name")
    return C


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    folders = _image_folders(root / "images")
    weights = _weights(root)
    (root / "stores").mkdir()
    stores = _stores(root / "stores")
    (root / "artifacts").mkdir()
    arts = _artifacts(root / "artifacts")
    cases = _cases(root, folders, weights, stores, arts)
    done = subprocess.run([sys.executable, "-m", "tests.faults.clidriver"], input=json.dumps(cases),
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    by_id = {r["id"]: r for r in json.loads(done.stdout)}
    return {"root": root, "cases": {c["id"]: c for c in cases}, "results": by_id, "weights": weights,
            "folders": folders, "stores": stores, "arts": arts}


class _R:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r["returncode"], r["stdout"], r["stderr"]


def test_every_bad_input_is_one_clear_line(results):
    failures = []
    for cid, case in results["cases"].items():
        r = results["results"][cid]
        if case["ok"]:
            continue
        try:
            SUMMARY[cid] = assert_clean_error(_R(r), *case["fragments"])
        except AssertionError as exc:
            failures.append(f"{cid}: {exc}\n  stderr: {r['stderr'][-600:]!r}")
    root = results["root"]
    assert not (root / "PWNED").exists()  # the pickle never ran
    assert not (root / "evil").exists() and not (root.parent / "evil").exists()
    assert not list(root.rglob("evil"))
    notstore = root / "out" / "my-photos"
    assert sorted(p.name for p in notstore.iterdir()) == ["holiday.jpg"]
    assert (notstore / "holiday.jpg").read_bytes() == b"precious"
    assert (root / "out" / "existing-artifact" / "keep.txt").exists()
    assert failures == [], "\n".join(failures)
    _write_summary(results)


def test_unreadable_images_are_counted_and_listed_others_converted(results):
    from soapflow.storage.feature_store import FeatureStore

    cid = next(c for c in results["cases"] if c.startswith("folder with corrupt"))
    r = results["results"][cid]
    assert r["returncode"] == 0 and "Traceback" not in r["stderr"], r["stderr"][-3000:]
    store = FeatureStore.open(results["cases"][cid]["argv"][results["cases"][cid]["argv"].index("--out") + 1])
    skipped = {Path(item["path"]).name: item["reason"] for item in store.attrs["skipped"]}
    assert set(skipped) == {"corrupt.jpg", "zero.png", "truncated.png", "truncated.jpg", "bomb.png", "bomb100m.png"}
    assert "Warning" not in r["stderr"] and "warn" not in r["stderr"], r["stderr"][-2000:]
    assert "0 bytes" in skipped["zero.png"]
    assert "decompression bomb" in skipped["bomb.png"] and "400000000 pixels" in skipped["bomb.png"]
    assert "10000x10000 = 100000000 pixels exceeds the limit" in skipped["bomb100m.png"]
    assert "truncated" in skipped["truncated.png"]
    assert store.attrs["n_skipped"] == 6 and "skipped files: 6" in r["stdout"]
    for name in skipped:
        assert f"skipped {results['folders']['mixed'] / name}" in r["stdout"]
    # CMYK, 16-bit, palette, alpha, LA and 1-bit images are converted to RGB and used
    assert store.count == 4 + 6
    assert np.isfinite(np.asarray(store.tokens[:], dtype=np.float32)).all()
    SUMMARY["unreadable images in a folder"] = "exit 0; skipped files: 6 — " + "; ".join(
        f"{k}: {v}" for k, v in sorted(skipped.items()))


def test_driver_matches_plain_subprocesses(results):
    """Two cases rerun as ordinary ``soap`` processes give the same exit code and line."""
    for cid in ("unknown backbone name", "τ = 0"):
        argv = results["cases"][cid]["argv"]
        plain = soap(*argv)
        driver = results["results"][cid]
        assert plain.returncode == driver["returncode"] == 2
        assert stderr_lines(plain.stderr) == stderr_lines(driver["stderr"])


def _write_summary(results):
    path = Path(results["root"]) / "summary.json"
    path.write_text(json.dumps(SUMMARY, indent=1, ensure_ascii=False))
    print("\n" + "\n".join(f"{k}\n    {v}" for k, v in SUMMARY.items()))
