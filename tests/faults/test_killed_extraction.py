"""kill -9 a real ``soap extract`` at many moments; every rerun redoes only unflagged chunks
and the finished store is bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

from soapflow.storage.feature_store import FeatureStore, lease_location
from tests.faults.conftest import CHUNK, N_IMAGES, extract_args
from tests.faults.helpers import ENV, REPO, chunk_state, killer_cmd, run, same_bits, soap_cmd, tokens_of

N_CHUNKS = N_IMAGES // CHUNK
EMPTY = {"flagged": set(), "tokens": {}, "partial": [], "group": False, "arrays": set()}

# (what the kill interrupts, killer spec, check of the state it leaves)
TARGETED = [
    ("creating the store: group and tokens written, completion array not yet",
     {"target": "zarr.core.group:Group.create_array", "when": "before", "nth": 2},
     lambda s: s["group"] and s["arrays"] == {"tokens"}),
    ("in the middle of writing chunk 3's tokens",
     {"target": "zarr.storage._local:_put", "when": "half", "match": "/tokens/c/3/"},
     lambda s: 3 in s["partial"] and 3 not in s["flagged"] and 3 not in s["tokens"]),
    ("chunk 6's tokens written, its completion flag not yet",
     {"target": "zarr.storage._local:_put", "when": "before", "match": "/complete/c/6"},
     lambda s: 6 in s["tokens"] and 6 not in s["flagged"] and not s["partial"]),
]
FINALIZE = ("every chunk flagged, finalize not yet",
            {"target": "soapflow.storage.feature_store:FeatureStore.finalize", "when": "before"},
            lambda s: s["flagged"] == set(range(N_CHUNKS)))


def _state(out: Path) -> dict:
    return chunk_state(out) if out.exists() else dict(EMPTY)


def _check_resume(before: dict, after: dict, what: str) -> int:
    """Chunks flagged before a run stay flagged and are never rewritten; returns how many
    chunks the run newly completed."""
    assert before["flagged"] <= after["flagged"], what
    for c in before["flagged"]:
        assert after["tokens"][c] == before["tokens"][c], f"{what}: complete chunk {c} was rewritten"
    return len(after["flagged"] - before["flagged"])


def _kill_when(proc: subprocess.Popen, condition, timeout=120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False if it exited first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return False


def _new_unflagged_write(out: Path, before: dict) -> bool:
    """A chunk whose tokens (or their temporary file) were written by this run while its
    completion flag is not there yet — the window a kill mid-chunk-write must hit."""
    try:
        flagged = {int(n) for n in os.listdir(out / "complete" / "c") if n.isdigit()}
        entries = [e for e in os.scandir(out / "tokens" / "c") if e.name.isdigit() and int(e.name) not in flagged]
    except FileNotFoundError:
        return False
    for e in entries:
        for dirpath, _, files in os.walk(e.path):
            for name in files:
                if name.endswith(".partial"):
                    return True
                st = os.stat(os.path.join(dirpath, name))
                if (st.st_ino, st.st_mtime_ns) != before["tokens"].get(int(e.name)):
                    return True
    return False


def test_killed_extraction_resumes_bit_identical(images, reference, tmp_path):
    out = tmp_path / "store"
    args = extract_args(images, out)
    log = []

    # 1. kills at exact points (the harness SIGKILLs the process from inside)
    for what, spec, expect in TARGETED:
        before = _state(out)
        result = run(killer_cmd(spec, *args))
        assert result.returncode == -signal.SIGKILL, (what, result.returncode, result.stderr[-3000:])
        after = _state(out)
        assert expect(after), (what, after)
        log.append((what, _check_resume(before, after, what)))
    # the partial write of chunk 3 was cleaned up by the next run, and chunk 3 redone
    assert 3 in _state(out)["flagged"]

    # 2. kills from outside at moments chosen by the clock, not by the code
    rng = random.Random(int(os.environ.get("SOAP_FAULT_SEED", "6")))
    lease = Path(lease_location(str(out)))  # gone once the last run released it
    for kind in ("as soon as a chunk is written without its flag", "at a random moment"):
        before = _state(out)
        proc = subprocess.Popen(soap_cmd(*args), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if kind.startswith("as soon"):
            killed = _kill_when(proc, lambda: _new_unflagged_write(out, before))
        else:  # after a random number of newly flagged chunks, plus a random fraction of a chunk's time
            k, delay = rng.randint(1, 5), rng.uniform(0.0, 0.03)
            flags_before = len(before["flagged"])
            reached = []

            def random_moment():
                if not reached:
                    try:
                        flags = [n for n in os.listdir(out / "complete" / "c") if n.isdigit()]
                        if len(flags) >= flags_before + k:
                            reached.append(time.monotonic())
                    except FileNotFoundError:
                        pass
                return bool(reached) and time.monotonic() - reached[0] >= delay

            killed = _kill_when(proc, random_moment)
        after = _state(out)
        rewritten = {c for c, v in after["tokens"].items()
                     if c not in after["flagged"] and before["tokens"].get(c) != v}
        hit = ("a chunk written without its flag" if rewritten or set(after["partial"]) - set(before["partial"])
               else "between chunks")
        log.append((f"external kill -9 {kind} ({'killed: ' + hit if killed else 'finished first'})",
                    _check_resume(before, after, kind)))

    # 3. kill inside finalize: every chunk flagged, the completion time not yet recorded
    what, spec, expect = FINALIZE
    before = _state(out)
    result = run(killer_cmd(spec, *args))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert expect(_state(out))
    assert "completed" not in FeatureStore.open(str(out)).attrs
    log.append((what, _check_resume(before, _state(out), what)))

    # 4. the rerun finishes, redoing exactly the chunks that were not flagged
    before = _state(out)
    pending = N_CHUNKS - len(before["flagged"])
    result = run(soap_cmd(*args))
    assert result.returncode == 0, result.stderr[-3000:]
    m = re.search(r"wrote (\d+) images in (\d+) chunks", result.stdout)
    assert m and int(m.group(2)) == pending, (result.stdout, pending)
    after = _state(out)
    _check_resume(before, after, "final run")
    assert after["flagged"] == set(range(N_CHUNKS)) and not after["partial"]
    assert not lease.exists()

    store = FeatureStore.open(str(out))
    assert "completed" in store.attrs
    ref_attrs = reference.attrs()
    for key in ("fingerprint", "backbone", "weights", "layer", "grid", "dim", "count", "n_skipped"):
        assert store.attrs[key] == ref_attrs[key], key
    assert store.attrs["n_skipped"] == 2
    assert same_bits(tokens_of(out), reference.tokens())
    total_new = sum(n for _, n in log) + pending
    assert total_new == N_CHUNKS  # every chunk was completed exactly once across all runs
    print("\n".join(f"{what}: {n} chunks completed" for what, n in log))
