"""Ctrl-C (a real SIGINT to the ``soap`` process) stops extraction at the next chunk, leaves only
complete chunks flagged, says how to resume and exits 130; the same command then resumes
(issue #19, item 2).

The extraction is made slow enough to interrupt mid-way: ViT-Ti at 224 px on one thread.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.faults.helpers import ENV, REPO, soap_cmd, stderr_lines

TINY = ["--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "224"]
CHUNK = 8


def _flagged(uri: str) -> tuple[int, list[int]]:
    """(number of chunks, flagged-complete chunk indices) of a store being written."""
    from soapflow.storage.feature_store import FeatureStore

    try:
        store = FeatureStore.open(uri)
    except Exception:  # not created yet
        return 0, []
    pending = set(store.pending_chunks())
    return store.n_chunks, [c for c in range(store.n_chunks) if c not in pending]


def _interrupt_after_first_chunk(cmd, store_glob: str, timeout: float = 400):
    """Start ``cmd``, send SIGINT once a chunk of a store matching ``store_glob`` is flagged;
    return (process result, seconds from SIGINT to exit)."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"finished before it could be interrupted: {proc.returncode}\n{err[-3000:]}")
            if any(_flagged(u)[1] for u in glob.glob(store_glob)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("no chunk was flagged in time")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _assert_interrupted(result, seconds, limit):
    err = result.stderr
    assert result.returncode == 130, (result.returncode, err[-3000:])
    assert "Traceback" not in err and "Crash detected" not in err, err[-3000:]
    assert stderr_lines(err)[-1] == "interrupted: rerun the same command to resume", stderr_lines(err)[-5:]
    print(f"stopped {seconds:.1f} s after SIGINT")
    assert seconds < limit, f"took {seconds:.1f} s to stop after SIGINT"


def _complete_chunks_only(uri: str) -> int:
    """Every flagged chunk holds finite, written tokens; returns how many are flagged."""
    from soapflow.storage.feature_store import FeatureStore

    n_chunks, done = _flagged(uri)
    assert 0 < len(done) < n_chunks, (done, n_chunks)  # stopped mid-way
    store = FeatureStore.open(uri)
    for c in done:
        r = store.chunk_range(c)
        tokens = np.asarray(store.tokens[r.start:r.stop], dtype=np.float32)
        assert np.isfinite(tokens).all() and np.abs(tokens).sum(axis=(1, 2, 3)).min() > 0, c
    return len(done)


def test_ctrl_c_stops_soap_extract_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "store"
    n = 400
    cmd = soap_cmd("extract", *TINY, "--source", "fashion-mnist:train", "--n", n, "--chunk", CHUNK, "--out", out)
    result, seconds = _interrupt_after_first_chunk(cmd, str(out))
    _assert_interrupted(result, seconds, limit=10)
    done = _complete_chunks_only(str(out))
    # the same command resumes: only the missing chunks are extracted
    again = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"wrote {n - done * CHUNK} images in {n // CHUNK - done} chunks" in again.stdout, again.stdout


def test_ctrl_c_stops_soap_refit(tmp_path):
    work = tmp_path / "work"
    cmd = soap_cmd("refit", *TINY, "--data", "fashion-mnist:train", "--n-real", 400, "--chunk", CHUNK,
                   "--workdir", work, "--no-publish")
    result, seconds = _interrupt_after_first_chunk(cmd, str(work / "stores" / "*" / "fashion-mnist*"))
    _assert_interrupted(result, seconds, limit=15)
    stores = glob.glob(str(work / "stores" / "*" / "*"))
    assert 1 <= len(stores) <= 2, stores
    real = next(s for s in stores if "fashion-mnist" in os.path.basename(s))
    _complete_chunks_only(real)
    for uri in stores:  # neither extraction ran on to the end
        n_chunks, done = _flagged(uri)
        assert len(done) < n_chunks, (uri, done)
    assert not (work / "artifacts").exists()
