"""The artifact registry on a local path and on a real S3 API (moto server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from soapflow.errors import SoapError
from soapflow.storage.artifact import read_artifact, read_manifest, write_artifact
from soapflow.storage.registry import Registry, default_registry_root, parse_ref, validate_name

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-vit/3"


# --------------------------------------------------------------------------------------------
# helpers and fixtures


def make_artifact(path, seed=0, d=8, components=None, scores=None, weights=None, **manifest):
    """A small but well-formed artifact with random tensors (content differs per seed)."""
    rng = np.random.default_rng(seed)
    if components is None:
        components, _ = np.linalg.qr(rng.normal(size=(d, d)))
        components = components.T
    if scores is None:
        scores = np.sort(rng.uniform(0.1, 1.0, size=d))[::-1]
    if weights is None:
        weights = np.where(np.arange(d) < 2, scores, 0.0)
    sup = components[weights > 0.5 * scores]
    projector = np.eye(d) - sup.T @ sup
    tensors = {
        "projector": projector.astype(np.float32), "mean": rng.normal(size=d), "components": components,
        "eigenvalues": np.linspace(2, 1, d), "scores": scores, "weights": weights,
        "p": rng.uniform(size=(2, 3, d)).astype(np.float32), "q": rng.uniform(size=(2, 3, d)).astype(np.float32),
    }
    base = {
        "name": None, "version": None, "backbone": "tiny-vit", "weights": "random", "layer": 3, "feature": "out",
        "image_size": 32, "grid": [2, 3], "dim": d, "mu": 2.0, "mu_mode": "fixed", "tau": 0.05, "gamma": 1.0,
        "threshold": 0.75, "suppress": None, "n_suppressed": int((weights > 0.5 * scores).sum()),
        "stores": {"real": {"uri": "/data/real", "fingerprint": "real-fp"},
                   "synthetic": {"uri": "/data/synth", "fingerprint": "synth-fp"}},
        "evaluation": {},
    }
    return write_artifact(path, tensors, {**base, **manifest}, extra_files={"plots/scores.png": b"\x89PNG fake"})


@pytest.fixture(scope="module")
def s3():
    from s3server import DUMMY_ENV, S3Server

    saved = {k: os.environ.get(k) for k in (*DUMMY_ENV, "AWS_ENDPOINT_URL")}
    server = S3Server().start()
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh registry root on each backend."""
    if request.param == "local":
        return str(tmp_path / "registry")
    server = request.getfixturevalue("s3")
    return f"s3://{server.new_bucket()}/registry"


def _opts(root):
    return None  # S3 roots find the endpoint through AWS_ENDPOINT_URL (set by the fixture)


def flip_byte(reg: Registry, key: str, offset: int = 100) -> None:
    data = bytearray(reg.store.read_bytes(key))
    data[offset % len(data)] ^= 0x01
    if reg.store.local_path(key) is not None:
        reg.store.local_path(key).write_bytes(bytes(data))
    else:
        reg.store.write_bytes(key, bytes(data))


# --------------------------------------------------------------------------------------------
# versions, aliases, lineage


def test_publish_aliases_and_rollback(root, tmp_path):
    reg = Registry(root, _opts(root))
    assert reg.names() == []
    results = [reg.publish(make_artifact(tmp_path / f"a{i}", seed=i), lineage={"flow_run_id": f"run-{i}"}) for i in range(3)]
    assert [(r.name, r.version, r.created) for r in results] == [(NAME, 1, True), (NAME, 2, True), (NAME, 3, True)]
    assert str(results[2]) == f"{NAME}:3"
    assert reg.names() == [NAME] and reg.versions(NAME) == [1, 2, 3]
    assert reg.aliases(NAME) == {"latest": 3}
    assert reg.resolve(NAME) == (NAME, 3) == reg.resolve(f"{NAME}@latest")

    assert reg.promote(NAME, 2, "production") is None
    assert reg.resolve(f"{NAME}@production") == (NAME, 2)
    r4 = reg.publish(make_artifact(tmp_path / "a3", seed=3))
    assert r4.version == 4
    assert reg.aliases(NAME) == {"latest": 4, "production": 2}  # only latest moves on publish
    assert reg.promote(NAME, 4, "production") == 2
    assert reg.promote(f"{NAME}:1", None, "production") == 4  # rollback, ref form
    assert reg.resolve(f"{NAME}@production") == (NAME, 1)
    reg.promote(NAME, 4, "canary")
    assert reg.aliases(NAME) == {"latest": 4, "production": 1, "canary": 4}

    rec = reg.record(f"{NAME}@production")
    assert rec["version"] == 1 and rec["aliases"] == ["production"] and rec["supersedes"] is None
    rec4 = reg.record(NAME)
    assert rec4["version"] == 4 and sorted(rec4["aliases"]) == ["canary", "latest"] and rec4["supersedes"] == 3
    rec2 = reg.record(f"{NAME}:2")
    assert rec2["lineage"]["flow_run_id"] == "run-1"
    assert rec2["lineage"]["stores"]["real"] == {"uri": "/data/real", "fingerprint": "real-fp", "count": None, "source": None}
    assert rec2["lineage"]["weights"] == "random" and rec2["lineage"]["backbone"] == "tiny-vit"
    assert rec2["parameters"]["tau"] == 0.05 and rec2["manifest"]["version"] == 2
    assert rec2["content_hash"] == read_manifest(tmp_path / "a1")["content_hash"]
    assert rec2["published"] and rec2["publisher"]["pid"] == os.getpid()

    with pytest.raises(SoapError, match="latest"):
        reg.promote(NAME, 1, "latest")
    with pytest.raises(SoapError, match=r"tiny-vit/3:9 does not exist"):
        reg.promote(NAME, 9, "production")


def test_duplicate_content_is_not_a_new_version(root, tmp_path):
    reg = Registry(root, _opts(root))
    art = make_artifact(tmp_path / "a", seed=1)
    first = reg.publish(art)
    again = reg.publish(art, lineage={"flow_run_id": "other"})
    assert first.created and not again.created and again.version == first.version == 1
    copy = make_artifact(tmp_path / "copy", seed=1)  # same tensors written elsewhere
    assert reg.publish(copy).version == 1
    assert reg.versions(NAME) == [1]
    assert reg.publish(art, name="other/name").created  # dedup is per name


def test_pull_verifies_and_refuses_tampering(root, tmp_path):
    reg = Registry(root, _opts(root))
    src = make_artifact(tmp_path / "src", seed=5)
    reg.publish(make_artifact(tmp_path / "first", seed=4))
    res = reg.publish(src, name="team/vit")
    out = reg.pull("team/vit", tmp_path / "pulled")
    art = read_artifact(out)
    assert art.manifest["name"] == "team/vit" and art.manifest["version"] == res.version == 1
    assert (out / "soap.safetensors").read_bytes() == (src / "soap.safetensors").read_bytes()
    assert (out / "plots" / "scores.png").read_bytes() == b"\x89PNG fake"
    with pytest.raises(SoapError, match="not empty"):
        reg.pull("team/vit", tmp_path / "pulled")
    assert reg.pull("team/vit:1", tmp_path / "pulled", overwrite=True) == tmp_path / "pulled"
    other = Registry(tmp_path / "other-registry")
    assert other.publish(out).ref == "team/vit:1"  # a pulled artifact keeps its name elsewhere

    flip_byte(reg, "team/vit/~versions/1/artifact/soap.safetensors")
    with pytest.raises(SoapError) as err:
        reg.pull("team/vit:1", tmp_path / "bad")
    msg = str(err.value)
    assert "team/vit:1" in msg and "soap.safetensors" in msg and "sha256" in msg and "refusing" in msg
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]  # no half-pulled leftovers
    with pytest.raises(SoapError, match="soap.safetensors"):
        reg.verify("team/vit:1")

    # the manifest is covered too: a changed parameter is refused
    key = f"{NAME}/~versions/1/artifact/manifest.json"
    manifest = json.loads(reg.store.read_bytes(key))
    manifest["tau"] = 0.5
    if reg.store.local_path(key) is not None:
        reg.store.local_path(key).write_text(json.dumps(manifest))
    else:
        reg.store.write_bytes(key, json.dumps(manifest).encode())
    with pytest.raises(SoapError, match="manifest.json"):
        reg.pull(f"{NAME}:1", tmp_path / "bad2")


def test_uncommitted_versions_are_invisible(root, tmp_path):
    """A publisher that died after claiming (and half-uploading) leaves nothing readers see."""
    reg = Registry(root, _opts(root))
    reg.publish(make_artifact(tmp_path / "a", seed=1))
    reg.store.create_bytes(f"{NAME}/~versions/2/claim.json", b"{}")
    reg.store.write_bytes(f"{NAME}/~versions/2/artifact/soap.safetensors", b"half")
    assert reg.versions(NAME) == [1] and reg.resolve(NAME) == (NAME, 1)
    with pytest.raises(SoapError, match=r"tiny-vit/3:2 does not exist"):
        reg.resolve(f"{NAME}:2")
    res = reg.publish(make_artifact(tmp_path / "b", seed=2))
    assert res.version == 3 and reg.versions(NAME) == [1, 3] and reg.record(NAME)["supersedes"] == 1
    reg.verify(f"{NAME}:3")


def test_evaluations_find_and_diff(root, tmp_path):
    reg = Registry(root, _opts(root))
    d = 6
    eye = np.eye(d)
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.05])
    weights = np.array([0.9, 0.0, 0.0, 0.0, 0.0, 0.0])  # suppress rank 0 only
    theta = np.radians(30)
    rotated = eye.copy()
    rotated[0] = np.cos(theta) * eye[0] + np.sin(theta) * eye[1]
    rotated[1] = -np.sin(theta) * eye[0] + np.cos(theta) * eye[1]
    a = reg.publish(make_artifact(tmp_path / "a", d=d, components=eye, scores=scores, weights=weights))
    b = reg.publish(make_artifact(tmp_path / "b", d=d, components=rotated, scores=scores * 0.5, weights=weights * 0.5,
                                  tau=0.1, stores={"real": {"uri": "/data/real2", "fingerprint": "real-fp2"}}))

    diff = reg.diff(a.ref, b.ref)
    assert diff["n_suppressed"] == [1, 1]
    assert diff["principal_angles_deg"] == pytest.approx([30.0], abs=1e-6)
    (m,) = diff["matches_a_to_b"]
    assert m["rank"] == 0 and m["match_rank"] == 0 and m["abs_cos"] == pytest.approx(np.cos(theta))
    assert m["score_change"] == pytest.approx(-0.45)
    p_a, p_b = np.eye(d) - np.outer(eye[0], eye[0]), np.eye(d) - np.outer(rotated[0], rotated[0])
    assert diff["projector_frobenius"] == pytest.approx(np.linalg.norm(p_a - p_b), rel=1e-6)
    assert diff["parameters"]["tau"] == [0.05, 0.1] and "stores.real.fingerprint" in diff["parameters"]
    same = reg.diff(a.ref, a.ref)
    assert same["same_content"] and same["projector_frobenius"] == 0 and same["principal_angles_deg"] == pytest.approx([0], abs=1e-6)

    before = reg.store.read_bytes(f"{NAME}/~versions/1/artifact/manifest.json")
    reg.record_evaluation(a.ref, {"spair": {"pck@0.1": 0.41}, "davis": {"j_and_f": np.float32(0.5)}})
    reg.record_evaluation(a.ref, {"spair": {"pck@0.1": 0.43}})  # last write wins per key
    rec = reg.record(a.ref)
    assert rec["evaluations"] == {"spair": {"pck@0.1": 0.43}, "davis": {"j_and_f": 0.5}}
    assert reg.store.read_bytes(f"{NAME}/~versions/1/artifact/manifest.json") == before  # artifact immutable
    reg.verify(a.ref)
    with pytest.raises(SoapError, match="evaluation key"):
        reg.record_evaluation(a.ref, {"../x": 1})
    with pytest.raises(SoapError, match="not JSON"):
        reg.record_evaluation(a.ref, {"bad": object()})

    assert reg.find_by_inputs("random", 3, "real-fp", {"mu": 2.0, "tau": 0.05, "gamma": 1.0, "threshold": 0.75,
                                                         "feature": "out", "image_size": 32}) == [(NAME, 1)]
    assert reg.find_by_inputs("random", 3, "real-fp2", {"tau": 0.1}) == [(NAME, 2)]
    assert reg.find_by_inputs("random", 3, "real-fp", {"tau": 0.1}) == []
    assert reg.find_by_inputs("random", 4, "real-fp", {}) == []
    assert reg.find_by_inputs("0" * 64, 3, "real-fp", {}) == []
    assert reg.find_by_inputs("random", 3, "real-fp", {"mu": "auto"}) == []
    assert reg.find(tau=0.1) == [(NAME, 2)]
    assert reg.find(**{"stores.real.fingerprint": "real-fp"}) == [(NAME, 1)]
    assert reg.find(lambda r: r["version"] > 1, name=NAME) == [(NAME, 2)]


def test_final_norm_in_lineage_and_inputs(tmp_path):
    """The final norm travels into the record (inputs, lineage), diff and find_by_inputs; a manifest
    from before it was recorded reads as fitted before the norm."""
    reg = Registry(tmp_path / "reg")
    old = reg.publish(make_artifact(tmp_path / "old", seed=1))  # no final_norm in the manifest
    new = reg.publish(make_artifact(tmp_path / "new", seed=2, final_norm=True), lineage={"flow_run_id": "x"})
    rec_old, rec_new = reg.record(old.ref), reg.record(new.ref)
    assert rec_old["inputs"]["final_norm"] is False and rec_old["lineage"]["final_norm"] is False
    assert rec_new["inputs"]["final_norm"] is True and rec_new["lineage"]["final_norm"] is True
    assert rec_new["lineage"]["flow_run_id"] == "x" and rec_new["manifest"]["final_norm"] is True
    assert reg.find_by_inputs("random", 3, "real-fp", {"final_norm": True}) == [(NAME, 2)]
    assert reg.find_by_inputs("random", 3, "real-fp", {"final_norm": False}) == [(NAME, 1)]
    assert reg.diff(old.ref, new.ref)["parameters"]["final_norm"] == [False, True]


# --------------------------------------------------------------------------------------------
# names and refs


BAD_NAMES = ["../x", "a/../b", "a/./b", "a//b", "/a", "a/", "a\\b", "a b", "a\nb", "a\x00b", "", "é", "a:b", "a@b", "~x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_rejected(name, tmp_path):
    with pytest.raises(SoapError) as err:
        validate_name(name)
    assert repr(name) in str(err.value)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(SoapError):
        reg.publish(make_artifact(tmp_path / "a"), name=name)
    assert not (tmp_path / "reg").exists() or reg.names() == []
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("ref", ["a@", "a:0", "a:x", "a:", "a@1x", "a@b:3", "../a:1", "", "a//b@production"])
def test_bad_refs_rejected(ref):
    with pytest.raises(SoapError) as err:
        parse_ref(ref)
    assert repr(ref) in str(err.value)


def test_refs_and_default_root(monkeypatch, tmp_path):
    assert parse_ref("dinov2_vits14/-1@production").alias == "production"
    assert parse_ref("dinov2_vits14/11:3").version == 3
    assert parse_ref("dinov2_vits14/11").alias == "latest"
    monkeypatch.delenv("SOAPFLOW_REGISTRY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_registry_root() == str(tmp_path / "xdg" / "soapflow" / "registry")
    monkeypatch.setenv("SOAPFLOW_REGISTRY", str(tmp_path / "env"))
    assert Registry().root == str(tmp_path / "env")


def test_unknown_name_version_alias(tmp_path):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(SoapError, match=r"no name 'nope/1'.*empty"):
        reg.resolve("nope/1")
    reg.publish(make_artifact(tmp_path / "a"))
    with pytest.raises(SoapError, match=r"no name 'nope/1'; names: tiny-vit/3"):
        reg.record("nope/1@production")
    with pytest.raises(SoapError, match=r"tiny-vit/3:7 does not exist; versions of tiny-vit/3: 1"):
        reg.pull(f"{NAME}:7", tmp_path / "x")
    with pytest.raises(SoapError, match=r"tiny-vit/3 has no alias 'staging' \(aliases: latest\)"):
        reg.resolve(f"{NAME}@staging")
    with pytest.raises(SoapError, match="does not exist"):
        reg.publish(tmp_path / "missing")
    (tmp_path / "nomani").mkdir()
    with pytest.raises(SoapError, match="manifest.json"):
        reg.publish(tmp_path / "nomani")
    broken = make_artifact(tmp_path / "broken", seed=9)
    data = bytearray((broken / "soap.safetensors").read_bytes())
    data[-1] ^= 1
    (broken / "soap.safetensors").write_bytes(bytes(data))
    with pytest.raises(SoapError, match="does not match"):
        reg.publish(broken)
    bare = make_artifact(tmp_path / "bare", seed=10, backbone=None)
    with pytest.raises(SoapError, match="--name"):
        reg.publish(bare)
    assert reg.publish(make_artifact(tmp_path / "q", seed=11, feature="k")).name == "tiny-vit/3/k"
    assert reg.names() == [NAME, "tiny-vit/3/k"]


# --------------------------------------------------------------------------------------------
# concurrency: 8 real processes


WORKER = r"""
import json, os, sys, time
from soapflow.storage.registry import Registry
root, art, ready, go = sys.argv[1:5]
reg = Registry(root)
reg.names()  # imports and connections warmed up before the start signal
open(ready, "w").close()
deadline = time.time() + 60
while not os.path.exists(go):
    if time.time() > deadline:
        sys.exit("no start signal")
    time.sleep(0.002)
res = reg.publish(art, name="team/vit-s", lineage={"flow_run_id": os.path.basename(art)})
print(json.dumps({"version": res.version, "created": res.created}))
"""


def test_concurrent_publish(root, tmp_path):
    n = 8
    arts = [make_artifact(tmp_path / f"run-{i}", seed=100 + i) for i in range(n)]
    hashes = {str(a): read_manifest(a)["content_hash"] for a in arts}
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, root, str(a), str(tmp_path / f"ready-{i}"), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        for i, a in enumerate(arts)
    ]
    reg = Registry(root)
    deadline = time.time() + 90
    while not all((tmp_path / f"ready-{i}").exists() for i in range(n)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    go.touch()
    seen = set()
    while any(p.poll() is None for p in procs):  # a reader never sees a half-written version
        for v in reg.versions("team/vit-s"):
            if v not in seen:
                reg.verify(f"team/vit-s:{v}")
                seen.add(v)
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["version"] for o in outs) == list(range(1, n + 1)) and all(o["created"] for o in outs)
    assert reg.versions("team/vit-s") == list(range(1, n + 1))
    assert reg.aliases("team/vit-s")["latest"] == n
    got = {}
    for v in range(1, n + 1):
        rec = reg.record(f"team/vit-s:{v}")
        src = str(tmp_path / rec["lineage"]["flow_run_id"])
        assert rec["content_hash"] == hashes[src]
        assert rec["supersedes"] is None or rec["supersedes"] < v
        got[src] = v
        pulled = reg.pull(f"team/vit-s:{v}", tmp_path / "pulled" / str(v))
        assert read_artifact(pulled).content_hash == hashes[src]
    assert len(got) == n


# --------------------------------------------------------------------------------------------
# the CLI


def _run_main(monkeypatch, capsys, *args):
    """``soap ...`` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    from soapflow.cli.main import main

    monkeypatch.setattr(sys, "argv", ["soap", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_local(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "reg")
    monkeypatch.setenv("SOAPFLOW_REGISTRY", root)
    a, b = make_artifact(tmp_path / "a", seed=1), make_artifact(tmp_path / "b", seed=2)
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "publish", str(a), "--lineage", '{"flow_run_id": "r1"}')
    assert (code, out) == (0, f"{NAME}:1\n")
    code, out, err = _run_main(monkeypatch, capsys, "registry", "publish", str(a))
    assert (code, out) == (0, f"{NAME}:1\n") and "already" in err and "no new version" in err
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "publish", str(b), "--name", "team/x", "--registry", root)
    assert (code, out) == (0, "team/x:1\n")
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "promote", f"{NAME}:1", "production")
    assert code == 0 and f"{NAME}@production → 1" in out
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "list", "--json")
    assert code == 0 and json.loads(out) == [
        {"name": "team/x", "versions": [1], "aliases": {"latest": 1}},
        {"name": NAME, "versions": [1], "aliases": {"latest": 1, "production": 1}},
    ]
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "list")
    assert code == 0 and NAME in out and "production→1" in out
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "list", NAME)
    assert code == 0 and "production" in out and "latest" in out
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "show", f"{NAME}@production", "--json")
    rec = json.loads(out)
    assert code == 0 and rec["ref"] == f"{NAME}:1" and rec["lineage"]["flow_run_id"] == "r1"
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "show", NAME)
    assert code == 0 and f"{NAME}:1" in out and "real-fp" in out
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "pull", NAME, "--to", str(tmp_path / "p"))
    assert code == 0 and read_artifact(tmp_path / "p").manifest["version"] == 1
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "diff", NAME, "team/x", "--json")
    assert code == 0 and json.loads(out)["n_suppressed"] == [2, 2]
    code, out, _ = _run_main(monkeypatch, capsys, "registry", "diff", NAME, "team/x")
    assert code == 0 and "principal angles" in out and "‖P_a − P_b‖_F" in out

    for args, needle in [
        (("registry", "show", "nope:1"), "'nope'"),
        (("registry", "show", f"{NAME}:5"), f"{NAME}:5 does not exist"),
        (("registry", "show", f"{NAME}@staging"), "no alias 'staging'"),
        (("registry", "publish", str(a), "--name", "../evil"), "'../evil'"),
        (("registry", "publish", str(a), "--name", "a//b"), "'a//b'"),
        (("registry", "promote", f"{NAME}:1", "latest"), "latest"),
        (("registry", "pull", f"{NAME}:1", "--to", str(tmp_path / "p")), "not empty"),
        (("registry", "list", "ghost"), "'ghost'"),
        (("registry", "publish", str(a), "--lineage", "[1]"), "--lineage must be a JSON object"),
        (("registry", "publish", str(a), "--lineage", "{run: 1}"), "--lineage is not a JSON object"),
        (("registry", "show", NAME, "-o", "novalue"), "KEY=VALUE"),
    ]:
        code, out, err = _run_main(monkeypatch, capsys, *args)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, err)


def test_cli_subprocess_exit_code(tmp_path):
    env = {**os.environ, "SOAPFLOW_REGISTRY": str(tmp_path / "reg"), "PYTHONPATH": str(REPO)}
    art = make_artifact(tmp_path / "a")
    ok = subprocess.run([sys.executable, "-m", "soapflow.cli", "registry", "publish", str(art)],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert ok.returncode == 0 and ok.stdout == f"{NAME}:1\n", ok.stderr
    bad = subprocess.run([sys.executable, "-m", "soapflow.cli", "registry", "pull", "x/../y", "--to", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'x/../y'" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_s3_storage_options(s3, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the explicit option points at the server
    root = f"s3://{s3.new_bucket()}/reg"
    opt = ("--storage-option", f"endpoint_url={s3.endpoint_url}")
    art = make_artifact(tmp_path / "a", seed=3)
    code, out, err = _run_main(monkeypatch, capsys, "registry", "publish", str(art), "--registry", root, *opt)
    assert (code, out) == (0, f"{NAME}:1\n"), err
    code, out, err = _run_main(monkeypatch, capsys, "registry", "promote", f"{NAME}@latest", "production", "-r", root, *opt)
    assert code == 0, err
    code, out, err = _run_main(monkeypatch, capsys, "registry", "pull", f"{NAME}@production", "--to", str(tmp_path / "p"),
                               "-r", root, "-o", f"client_kwargs.endpoint_url={s3.endpoint_url}")
    assert code == 0, err
    assert read_artifact(tmp_path / "p").content_hash == read_manifest(art)["content_hash"]
    monkeypatch.setenv("SOAPFLOW_STORAGE_OPTIONS", json.dumps({"endpoint_url": s3.endpoint_url}))
    monkeypatch.setenv("SOAPFLOW_REGISTRY", root)
    code, out, err = _run_main(monkeypatch, capsys, "registry", "list", "--json")
    assert code == 0 and json.loads(out)[0]["aliases"] == {"latest": 1, "production": 1}, err


# --------------------------------------------------------------------------------------------
# feature stores and fits on S3


def test_s3_feature_stores_fit_identical_to_local(s3, tmp_path):
    from storehelp import positional_tokens

    from soapflow.fit import fit_to_artifact
    from soapflow.storage.feature_store import FeatureStore

    bucket = s3.new_bucket()
    opts = s3.storage_options
    real, synth = positional_tokens(40, seed=1), positional_tokens(24, seed=2, scale=0.2)
    for where in ("local", "s3"):
        for role, tokens in (("real", real), ("synth", synth)):
            uri = str(tmp_path / f"{role}.zarr") if where == "local" else f"s3://{bucket}/stores/{role}.zarr"
            store = FeatureStore.create(uri, count=len(tokens), grid=tokens.shape[1:3], dim=tokens.shape[3], chunk=16,
                                        dtype="float32", attrs={"backbone": "test-vit", "layer": 3, "fingerprint": f"{role}-fp"},
                                        storage_options=opts if where == "s3" else None)
            for i in store.pending_chunks():
                rows = store.chunk_range(i)
                store.write_chunk(i, tokens[rows.start:rows.stop])
            store.finalize()
    reopened = FeatureStore.open(f"s3://{bucket}/stores/real.zarr", opts)
    reopened.require_complete()
    assert np.array_equal(np.asarray(reopened.tokens[:]), real)
    assert reopened.attrs["fingerprint"] == "real-fp"

    _, _, m_local = fit_to_artifact(str(tmp_path / "real.zarr"), str(tmp_path / "synth.zarr"), str(tmp_path / "fit-local"),
                                    plots=False, progress=False)
    _, _, m_s3 = fit_to_artifact(f"s3://{bucket}/stores/real.zarr", f"s3://{bucket}/stores/synth.zarr",
                                 str(tmp_path / "fit-s3"), plots=False, progress=False, storage_options=opts)
    a, b = read_artifact(tmp_path / "fit-local"), read_artifact(tmp_path / "fit-s3")
    for key in a.tensors:
        assert np.array_equal(a.tensors[key], b.tensors[key]), key
    assert m_local["content_hash"] == m_s3["content_hash"]
    assert m_s3["stores"]["real"]["uri"] == f"s3://{bucket}/stores/real.zarr"
    assert m_s3["n_suppressed"] >= 1

    reg = Registry(f"s3://{bucket}/registry", opts)
    res = reg.publish(tmp_path / "fit-s3", lineage={"flow_run_id": "s3-fit"})
    assert res.ref == "test-vit/3:1"
    assert not reg.publish(tmp_path / "fit-local").created  # same content, however it was read
    assert reg.find_by_inputs(None, 3, "real-fp", {"mu": 2.0}) == [("test-vit/3", 1)]
    pulled = reg.pull("test-vit/3", tmp_path / "pulled")
    assert np.array_equal(read_artifact(pulled).projector, a.projector)


# --------------------------------------------------------------------------------------------
# MLflow


def test_export_mlflow(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no network calls from the test
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    from mlflow import MlflowClient

    root = str(tmp_path / "reg")
    reg = Registry(root)
    reg.publish(make_artifact(tmp_path / "a", seed=1))
    reg.publish(make_artifact(tmp_path / "b", seed=2))
    reg.promote(NAME, 1, "production")
    reg.record_evaluation(f"{NAME}:1", {"spair": {"pck": 0.4}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("registry", "export-mlflow", f"{NAME}@production", "--tracking-uri", uri, "--registry", root,
            "--artifact-location", str(tmp_path / "mlruns"))
    code, out, err = _run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "registered MLflow model soap-tiny-vit.3 version 1 aliases production" in out
    client = MlflowClient(uri, uri)
    mv = client.get_model_version_by_alias("soap-tiny-vit.3", "production")
    assert str(mv.version) == "1" and mv.tags["soapflow.content_hash"] == reg.content_hash(f"{NAME}:1")
    files = {f.path for f in client.list_artifacts(mv.run_id, "soap")}
    assert {"soap/soap.safetensors", "soap/manifest.json", "soap/plots"} <= files
    local = client.download_artifacts(mv.run_id, "soap", str(tmp_path / "dl"))
    assert read_artifact(local).content_hash == mv.tags["soapflow.content_hash"]
    run = client.get_run(mv.run_id)
    assert run.data.params["tau"] == "0.05" and run.data.metrics["spair.pck"] == pytest.approx(0.4)
    assert run.data.params["final_norm"] == "False"  # make_artifact writes none: fitted before the norm

    code, out, err = _run_main(monkeypatch, capsys, *args)  # again: nothing new
    assert code == 0 and "already registered as MLflow model soap-tiny-vit.3 version 1" in out
    code, out, err = _run_main(monkeypatch, capsys, "registry", "export-mlflow", NAME, "--tracking-uri", uri,
                               "--registry", root, "--model-name", "mine")
    assert code == 0 and "mine version 1" in out
    (mine,) = client.search_model_versions("name='mine'")
    assert mine.tags["soapflow.version"] == "2"

    monkeypatch.setitem(sys.modules, "mlflow", None)
    code, out, err = _run_main(monkeypatch, capsys, *args)
    assert code == 2 and "pip install 'soapflow[mlflow]'" in err


def test_s3_missing_bucket_is_a_clear_error(s3, tmp_path):
    reg = Registry("s3://no-such-bucket-soap/reg")
    assert reg.names() == []
    with pytest.raises(SoapError, match=r"no name 'tiny-vit/3'"):
        reg.resolve(NAME)
    with pytest.raises(SoapError, match=r"registry s3://no-such-bucket-soap/reg: cannot create"):
        reg.publish(make_artifact(tmp_path / "a"))


def test_storage_options_from_environment(monkeypatch):
    from soapflow.storage.registry import default_storage_options

    monkeypatch.delenv("SOAPFLOW_STORAGE_OPTIONS", raising=False)
    assert default_storage_options() is None
    monkeypatch.setenv("SOAPFLOW_STORAGE_OPTIONS", '{"endpoint_url": "http://127.0.0.1:9"}')
    assert default_storage_options() == {"endpoint_url": "http://127.0.0.1:9"}
    for bad, needle in (('["x"]', "must be a JSON object"), ("{x", "is not a JSON object")):
        monkeypatch.setenv("SOAPFLOW_STORAGE_OPTIONS", bad)
        with pytest.raises(SoapError, match=f"SOAPFLOW_STORAGE_OPTIONS {needle}"):
            default_storage_options()
