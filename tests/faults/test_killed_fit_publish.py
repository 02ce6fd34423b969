"""kill -9 during ``soap fit`` and ``soap registry publish``: no partial artifact is ever
visible, the registry stays consistent, and the rerun succeeds."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from soapflow.storage.artifact import read_manifest, verify_artifact
from tests.faults.helpers import killer_cmd, run, soap


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from storehelp import positional_tokens, write_store

    root = tmp_path_factory.mktemp("fitstores")
    write_store(root / "real", positional_tokens(40, h=3, w=3, d=16, seed=1), chunk=8)
    write_store(root / "synth", positional_tokens(30, h=3, w=3, d=16, seed=2, scale=0.3), chunk=8)
    return root


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _fit_args(stores, out, *extra):
    return ["fit", str(stores / "real"), str(stores / "synth"), "--out", str(out), "--no-plots", *extra]


def test_killed_fit_leaves_no_partial_artifact(stores, tmp_path):
    from soapflow.fit import fit_to_artifact

    out = tmp_path / "artifact"
    kills = [
        ("computing the fit", {"target": "soapflow.method:soap_from_statistics", "when": "before"}, False),
        ("tensors written to the temporary directory, manifest not yet",
         {"target": "soapflow.storage.artifact:save_file", "when": "after"}, True),
        ("artifact complete in its temporary directory, not yet moved into place",
         {"target": "soapflow.storage.artifact:_move_into_place", "when": "before"}, True),
    ]
    for what, spec, leaves_temporary in kills:
        result = run(killer_cmd(spec, *_fit_args(stores, out)))
        assert result.returncode == -signal.SIGKILL, (what, result.stderr[-3000:])
        assert not out.exists(), what  # nothing visible at the artifact path
        assert bool(_hidden(out)) == leaves_temporary, what
    assert _hidden(out)  # the killed writers' temporary directories are there ...

    rerun = soap(*_fit_args(stores, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = verify_artifact(out)
    assert _hidden(out) == []  # ... and the rerun removed them
    # the same inputs fitted in this process give the same content hash (determinism across runs)
    _, _, in_process = fit_to_artifact(str(stores / "real"), str(stores / "synth"), str(tmp_path / "again"),
                                       plots=False, progress=False)
    assert in_process["content_hash"] == manifest["content_hash"]

    # replacing an artifact (--overwrite) and being killed just before the swap: the old one stays whole
    old_hash = manifest["content_hash"]
    killed = run(killer_cmd({"target": "soapflow.storage.artifact:_exchange", "when": "before"},
                            *_fit_args(stores, out, "--overwrite", "--mu", "1")))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert verify_artifact(out)["content_hash"] == old_hash
    rerun = soap(*_fit_args(stores, out, "--overwrite", "--mu", "1"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    new = verify_artifact(out)
    assert new["content_hash"] != old_hash and new["mu"] == 1.0
    assert _hidden(out) == []


def _artifact(path: Path, seed: int) -> Path:
    from soapflow.storage.artifact import TENSOR_NAMES, write_artifact

    rng = np.random.default_rng(seed)
    tensors = {k: rng.normal(size=(8, 8)).astype(np.float32) for k in TENSOR_NAMES}
    return write_artifact(path, tensors, {"backbone": "test-vit", "layer": 3},
                          extra_files={f"plots/p{i}.png": bytes(rng.integers(0, 255, 4096, dtype=np.uint8))
                                       for i in range(4)})


def test_killed_publish_keeps_the_registry_consistent(tmp_path):
    from soapflow.storage.registry import Registry

    root, name = tmp_path / "registry", "team/model"
    reg = Registry(root)
    first = reg.publish(_artifact(tmp_path / "a1", 1), name=name)
    reg.promote(name, first.version, "production")
    art = _artifact(tmp_path / "a2", 2)
    args = ["registry", "publish", str(art), "--name", name, "--registry", str(root)]
    kills = [
        ("version number claimed, nothing uploaded",
         {"target": "soapflow.storage.objectstore:LocalStore.create_bytes", "when": "after", "nth": 1}),
        ("in the middle of uploading the artifact's files", {"target": "shutil:copyfile", "when": "after", "nth": 2}),
        ("artifact and record written, commit marker not yet",
         {"target": "soapflow.storage.objectstore:LocalStore.create_bytes", "when": "before", "nth": 2}),
    ]
    for what, spec in kills:
        result = run(killer_cmd(spec, *args))
        assert result.returncode == -signal.SIGKILL, (what, result.stderr[-3000:])
        # readers see exactly what was there before: one committed, verified version
        assert reg.versions(name) == [first.version], what
        assert reg.resolve(name) == (name, first.version) and reg.resolve(f"{name}@production")[1] == first.version
        assert reg.names() == [name]
        reg.verify(f"{name}:{first.version}")
    claimed = sorted(int(p.name) for p in (root / name / "~versions").iterdir())
    assert claimed == [1, 2, 3, 4]  # three claimed numbers left behind, all invisible

    rerun = soap(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.strip() == f"{name}:5"  # the next publisher steps over the abandoned numbers
    assert reg.versions(name) == [1, 5] and reg.resolve(name) == (name, 5)
    manifest = reg.verify(f"{name}:5")
    assert manifest["content_hash"] == read_manifest(art)["content_hash"]
    pulled = reg.pull(f"{name}:5", tmp_path / "pulled")
    assert sorted(p.name for p in (pulled / "plots").iterdir()) == [f"p{i}.png" for i in range(4)]
    again = soap(*args)  # identical content: no new version
    assert again.returncode == 0 and again.stdout.strip() == f"{name}:5"
    assert reg.versions(name) == [1, 5]
    assert json.loads((root / name / "~aliases" / "production.json").read_text())["version"] == 1
