"""docs/render_results.py: the results page and README table come from the commands' JSON."""

import importlib.util
import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from soapflow.config import BackboneSpec, DataSpec, EvalSettings, RunSettings
from soapflow.evaluation.scan import scan

REPO = Path(__file__).resolve().parents[1]


def _renderer():
    spec = importlib.util.spec_from_file_location("render_results", REPO / "docs" / "render_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_page_and_readme_rendered_from_json(tmp_path):
    from soapflow.cli.main import app

    data = tmp_path / "data"
    data.mkdir()
    scan(BackboneSpec("vit_tiny_patch16_224", weights="random", image_size=32, device="cpu"), "1,-1",
         DataSpec(real="fashion-mnist:train", n_real=8, n_synth=8),
         evaluation=EvalSettings(evaluations=("salient", "knn-seg", "knn-cls"), n=6, bank_n=8, n_boot=100),
         run=RunSettings(workdir=str(tmp_path / "work"), progress=False), keep_work=True,
         artifacts_dir=str(tmp_path / "arts"), out_dir=str(tmp_path / "scan"))
    shutil.copy(tmp_path / "scan" / "scan.json", data / "scan.json")
    res = CliRunner().invoke(app, ["eval", "salient", "--head", str(tmp_path / "arts" / "L11"), "--dataset",
                                   "fashion-mnist", "--n", "6", "--tau", "0.2", "--soap-tau", "0.3", "--n-boot", "100",
                                   "--cache-dir", str(tmp_path / "work" / "tokens"),
                                   "--json", str(data / "salient-L11-tau0.2-soap0.3.json")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    readme = tmp_path / "README.md"
    r = _renderer()
    readme.write_text(f"# x\n\n{r.README_BEGIN}\nold table\n{r.README_END}\n\nrest\n")
    commands = tmp_path / "cmds.sh"
    commands.write_text("#!/bin/bash\nsoap scan --layers 1,11\n")
    out = tmp_path / "results.md"
    assert r.main(["--data", str(data), "--out", str(out), "--readme", str(readme), "--commands", str(commands),
                   "--notes", str(tmp_path / "none.md")]) == 0

    page, scan_json = out.read_text(), json.loads((data / "scan.json").read_text())
    pairing = json.loads((data / "salient-L11-tau0.2-soap0.3.json").read_text())
    for s in scan_json["layers"]:  # SI per block, straight from scan.json
        norm = "after" if s["layer"] == 11 else "before"
        assert f"| {s['layer']} | {norm} | {s['max_si']:.3f} |" in page
    m = pairing["metrics"]["max_fbeta"]
    row = (f"| 11 | TokenCut τ raw 0.2 / SOAP 0.3 | max_fbeta | {100 * m['raw']['value']:.2f} | "
           f"{100 * m['soap']['value']:.2f} | {100 * m['delta']['value']:+.2f} [")
    assert row in page
    knn = scan_json["evaluations"]["1"]["knn-seg"]["metrics"]["miou"]
    assert f"| 1 | patch kNN seg (k=10, " in page and f"| {100 * knn['raw']['value']:.2f} |" in page
    assert "docs/data/planted.json` is not there yet" in page  # no planted report in this data folder
    assert "soap scan --layers 1,11" in page and "#!/bin/bash" not in page

    text = readme.read_text()
    assert "old table" not in text and text.endswith("rest\n")
    assert (f"| 11 | after final norm | TokenCut raw τ=0.2 vs SOAP τ=0.3 (authors' pairing) | "
            f"{100 * m['raw']['value']:.2f} → {100 * m['soap']['value']:.2f} |") in text
    assert "block 11 (after the final norm)" in text
