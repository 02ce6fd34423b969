"""Extraction onto a file system that fills up: one clear error naming the store, finished
chunks kept, and the same command resumes once space is freed."""

from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import pytest

from tests.faults.conftest import CHUNK, N_IMAGES, extract_args
from tests.faults.helpers import assert_clean_error, chunk_state, killer_cmd, run, same_bits, soap_cmd, tokens_of

N_CHUNKS = N_IMAGES // CHUNK
FREE_BYTES = 160 * 1024  # about a third of what the store needs


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test (root only); None where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        yield None
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_keeps_finished_chunks_and_resumes(images, reference, small_disk, tmp_path):
    if small_disk is not None:
        out = small_disk / "store"
        vfs = os.statvfs(small_disk)
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (vfs.f_bavail * vfs.f_frsize - FREE_BYTES))
        first = run(soap_cmd(*extract_args(images, out)))
        how = "tmpfs"
    else:  # no mount allowed: zarr's file writes fail with ENOSPC past the same budget
        out = tmp_path / "store"
        spec = {"target": "zarr.storage._local:_put", "when": "enospc", "budget": FREE_BYTES}
        first = run(killer_cmd(spec, *extract_args(images, out)))
        filler = None
        how = "simulated ENOSPC"

    line = assert_clean_error(first, str(out), "No space left on device (ENOSPC)", "complete and kept",
                              "rerun the same command to resume")
    state = chunk_state(out)
    done = state["flagged"]
    assert 0 < len(done) < N_CHUNKS, (how, line)
    assert f"{len(done)} of {N_CHUNKS} chunks are complete" in line
    assert not state["partial"]  # zarr removes the temporary file of the failed write
    ref = reference.tokens()
    kept = tokens_of(out)
    for c in done:  # finished chunks are kept, bit for bit
        rows = slice(c * CHUNK, (c + 1) * CHUNK)
        assert same_bits(kept[rows], ref[rows]), c

    if filler is not None:
        filler.unlink()
    second = run(soap_cmd(*extract_args(images, out)))
    assert second.returncode == 0, second.stderr[-3000:]
    m = re.search(r"wrote (\d+) images in (\d+) chunks", second.stdout)
    assert m and int(m.group(2)) == N_CHUNKS - len(done), second.stdout
    assert same_bits(tokens_of(out), ref)
    assert np.isfinite(tokens_of(out)).all()
    print(f"\n{how}: first run stopped with {len(done)}/{N_CHUNKS} chunks; {line}")
