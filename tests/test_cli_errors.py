"""Bad input to ``soap refit`` and ``soap registry``: one line naming the flag, exit code 2, before
any Prefect server or flow starts, and nothing left on disk (issue #19, items 1 and 3).

Every command runs as a real ``soap`` process. Prefect logs at INFO here, so a temporary server
that was started ("Starting temporary server") or a flow that ran ("Flow run") would show.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.faults.helpers import ENV, REPO, assert_clean_error, soap_cmd

LOUD = {**ENV, "PREFECT_LOGGING_LEVEL": "INFO"}
TINY = ["--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "32"]


def _soap(*args, env=LOUD, timeout=300):
    t = time.perf_counter()
    result = subprocess.run(soap_cmd(*args), capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    return result, time.perf_counter() - t


def _no_prefect_run(result):
    text = result.stdout + result.stderr
    assert "Starting temporary server" not in text and "Flow run" not in text and "Task run" not in text, text[-3000:]


@pytest.fixture(scope="module")
def baseline_seconds():
    """How long a bare `soap` command that fails at once takes on this machine right now."""
    result, seconds = _soap("refit", "--n-real", "0")
    assert result.returncode == 2
    return seconds


@pytest.mark.parametrize("args, fragments", [
    (["--n-real", "0"], ["--n-real must be ≥ 1, got 0"]),
    (["--n-synth", "-3"], ["--n-synth must be ≥ 1, got -3"]),
    (["--chunk", "0"], ["--chunk must be ≥ 1, got 0"]),
    (["--image-size", "0"], ["--image-size must be ≥ 1, got 0"]),
    (["--gamma", "0"], ["--gamma must be > 0"]),
    (["--threshold", "1.5"], ["--threshold", "[0, 1]"]),
    (["--mu", "lots"], ["--mu must be a number"]),
    (["--data", "/no/such/folder"], ["--data /no/such/folder", "does not exist"]),
    (["--weights", "/no/such/weights.safetensors"], ["--weights /no/such/weights.safetensors", "not found"]),
    (["--evaluate", "knn-sgm"], ["--evaluate", "knn-sgm"]),
])
def test_refit_rejects_bad_input_before_anything_starts(tmp_path, baseline_seconds, args, fragments):
    work = tmp_path / "work"
    result, seconds = _soap("refit", *TINY, "--workdir", work, *args)
    assert_clean_error(result, *fragments)
    _no_prefect_run(result)
    assert not work.exists(), list(work.rglob("*"))  # no store (empty or not) left behind
    # these need no model: as fast as the quickest failing command (plus scheduling noise)
    assert seconds < 3 * baseline_seconds + 2, (seconds, baseline_seconds)


@pytest.mark.parametrize("args, fragments", [
    (["--backbone", "vit_small_patch14_dinov2"], ["has no bundled weights", "--weights PATH", "--weights random",
                                                  "'dinov2_vits14'"]),
    (["--backbone", "dinov2_vitz"], ["unknown backbone 'dinov2_vitz'", "did you mean dinov2_vits14"]),
    (["--backbone", "vit_tiny_patch16_224", "--weights", "random", "--layer", "12"], ["layer 12 is out of range"]),
    (["--backbone", "vit_tiny_patch16_224", "--weights", "random", "--feature", "xyz"], ["unknown feature 'xyz'"]),
    (["--data", "EMPTY"], ["is empty"]),
])
def test_refit_bad_backbone_or_source_is_one_line_without_a_flow(tmp_path, args, fragments):
    empty = tmp_path / "empty"
    empty.mkdir()
    work = tmp_path / "work"
    args = [str(empty) if a == "EMPTY" else a for a in args]
    result, seconds = _soap("refit", "--workdir", work, *args)
    assert_clean_error(result, *fragments)
    _no_prefect_run(result)  # the temporary server was stopped before anyone used it
    assert not work.exists()


def test_refit_tail_of_a_flow_error_has_no_prefect_traceback(tmp_path):
    """A bad input that reaches the flow (here: the flow called from Python, as a deployment would)
    is logged by Prefect as one line, not a traceback."""
    code = f"""
import sys
from soapflow.flows.refit import refit
from soapflow.config import RefitConfig
from soapflow.errors import SoapError
try:
    refit(RefitConfig.from_flat(dict(backbone="vit_tiny_patch16_224", weights="random", image_size=32, n_synth=-3,
                                     workdir={str(tmp_path)!r})))
except SoapError as exc:
    print("caught:", exc)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=LOUD, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "caught: --n-synth must be ≥ 1, got -3" in result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    failed = [line for line in result.stderr.splitlines() if "--n-synth must be ≥ 1" in line]
    assert failed, result.stderr[-3000:]  # Prefect still says what failed, in one line
    assert not (tmp_path / "stores").exists()


def test_registry_commands_refuse_a_root_that_does_not_exist(tmp_path):
    typo = tmp_path / "typo"
    for args in (["registry", "list"], ["registry", "show", "x/1"], ["registry", "list", "x/1"]):
        result, _ = _soap(*args, "--registry", typo)
        assert_clean_error(result, f"--registry {typo}", "no such directory")
    afile = tmp_path / "afile"
    afile.write_text("x")
    result, _ = _soap("registry", "list", "--registry", afile)
    assert_clean_error(result, "is a file")
    # an existing but empty registry is still just empty
    empty = tmp_path / "empty"
    empty.mkdir()
    result, _ = _soap("registry", "list", "--registry", empty)
    assert result.returncode == 0 and "is empty" in result.stderr
