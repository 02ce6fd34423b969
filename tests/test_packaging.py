"""Installed names (issue 18 §5): one top-level package, `soapflow`, with the stage folders inside it."""

import os
import subprocess
import sys
import tomllib

from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_installs_under_soapflow():
    cfg = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    dirs = {"soapflow": "soapflow", **cfg["package-dir"]}
    found = set()
    for name, folder in dirs.items():
        found |= {name} | {f"{name}.{p}" for p in find_packages(os.path.join(ROOT, folder))}
    assert set(cfg["packages"]) == found  # a new subpackage must be listed, or the wheel lacks it
    assert {p.split(".")[0] for p in cfg["packages"]} == {"soapflow"}
    assert set(cfg["package-dir"]) == {"soapflow.flows", "soapflow.tasks", "soapflow.storage",
                                       "soapflow.noise_generators"}


def test_stage_modules_import_as_soapflow_names_from_a_checkout(tmp_path):
    code = ("import sys, soapflow.storage.registry as r, soapflow.flows.refit, soapflow.noise_generators as ng\n"
            "assert r.__file__.endswith('storage/registry.py') and 'mixture' in ng.GENERATORS\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('storage', 'tasks', 'flows', 'noise_generators')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # nothing imports the generic top-level names any more
