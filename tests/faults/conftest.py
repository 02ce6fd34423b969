"""Fixtures shared by the fault-injection tests (see tests/faults/__init__.py)."""

from __future__ import annotations

import subprocess

import pytest

from tests.faults.helpers import BACKBONE, ENV, REPO, make_images, soap_cmd

N_IMAGES = 200  # usable images in the shared folder (two more files are unreadable)
CHUNK = 8       # → 25 chunks, the last one full


@pytest.fixture(autouse=True)
def _private_registry(tmp_path, monkeypatch):
    """Refits publish by default: never into the user's registry."""
    root = str(tmp_path / "default-registry")
    monkeypatch.setenv("SOAPFLOW_REGISTRY", root)
    monkeypatch.setitem(ENV, "SOAPFLOW_REGISTRY", root)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    folder = make_images(tmp_path_factory.mktemp("faults") / "images", N_IMAGES)
    (folder / "zzz-empty.jpg").write_bytes(b"")
    (folder / "zzz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return folder


def extract_args(images, out, *extra):
    return ["extract", *BACKBONE, "--source", str(images), "--chunk", str(CHUNK), "--out", str(out), *extra]


class Reference:
    """An uninterrupted extraction of the shared folder, started in the background so it
    overlaps with the (mostly waiting) tests that compare against it."""

    def __init__(self, images, out):
        self.path = out
        self._proc = subprocess.Popen(soap_cmd(*extract_args(images, out)), env=ENV, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._tokens = None

    def tokens(self):
        if self._tokens is None:
            out, err = self._proc.communicate(timeout=300)
            assert self._proc.returncode == 0, err[-3000:]
            assert f"wrote {N_IMAGES} images in {N_IMAGES // CHUNK} chunks" in out, out
            from tests.faults.helpers import tokens_of

            self._tokens = tokens_of(self.path)
        return self._tokens

    def attrs(self):
        from soapflow.storage.feature_store import FeatureStore

        self.tokens()
        return FeatureStore.open(str(self.path)).attrs


@pytest.fixture(scope="session")
def reference(images, tmp_path_factory):
    ref = Reference(images, tmp_path_factory.mktemp("reference") / "store")
    yield ref
    if ref._proc.poll() is None:
        ref._proc.kill()
        ref._proc.wait()


@pytest.fixture
def no_leftover_leases():
    """Every lease a test takes in this process is released by its end."""
    from soapflow.storage import lease

    yield
    assert not lease._LEASES, lease._LEASES

