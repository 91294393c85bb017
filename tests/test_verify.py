"""`medfl verify EXPORT_OR_BUNDLE`: every sha256 an export's manifest or a bundle's metadata records is checked
and printed; the first file that differs or is missing is one line naming it (exit 1); names that leave the
folder are refused; neither torch nor MONAI is loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from test_export import tiny_runs

from medfl.cli import main
from medfl.deliver import export_run
from medfl.tasks import task_for

pytestmark = pytest.mark.slow

EXPORT_FILES = ["model.pt", "model.pt2", "eval_transforms.yaml"]
BUNDLE_FILES = ["models/model.ts", "models/model.pt", "configs/inference.json", "docs/README.md"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    runs = tiny_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("verify")
    export_run(runs["classification"], out=out / "exports", task=task_for("classification"))
    export_run(runs["classification"], out=out / "bundles", sites=["derm_a"], export_format="bundle",
               task=task_for("classification"))
    return {"exports": out / "exports", "bundle": out / "bundles" / "derm_a"}


def _checked(printed: str) -> list[str]:
    return [line.split()[1] for line in printed.splitlines() if line.startswith("  ok  ")]


def test_an_export_root_and_a_bundle_are_checked_file_by_file_without_torch(setup):
    code = ("import sys, medfl.cli\n"
            f"status = [medfl.cli.main(['verify', path]) for path in {[str(setup['exports']), str(setup['bundle'])]!r}]\n"
            "print('torch' in sys.modules, 'monai' in sys.modules, status)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "False False [0, 0]", result.stderr
    assert _checked(result.stdout) == EXPORT_FILES * 2 + BUNDLE_FILES
    assert "export of site 'derm_a'" in result.stdout and "export of site 'derm_b'" in result.stdout
    assert "bundle of site 'derm_a'" in result.stdout and result.stderr == ""
    digest = json.loads((setup["bundle"] / "configs" / "metadata.json").read_text())["sha256"]["models/model.ts"]
    assert f"ok  models/model.ts  sha256 {digest}" in result.stdout


@pytest.mark.parametrize("name", ["derm_b/model.pt2", "derm_b/eval_transforms.yaml"])
def test_a_changed_export_file_is_named_after_what_was_checked(setup, tmp_path, capsys, name):
    root = tmp_path / "exports"
    shutil.copytree(setup["exports"], root)
    with open(root / name, "ab") as stream:
        stream.write(b"\0")
    assert main(["verify", str(root)]) == 1
    captured = capsys.readouterr()
    assert _checked(captured.out) == EXPORT_FILES  # derm_a, checked before derm_b
    recorded = json.loads((root / "derm_b" / "manifest.json").read_text())["files"][name.split("/")[1]]
    assert captured.err.strip() == (f"medfl verify: error: site 'derm_b': {root / name}: sha256 differs from the "
                                    f"manifest's ({recorded[:12]}...): the file changed after export")


@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_a_changed_or_missing_bundle_file_is_one_line_naming_it(setup, tmp_path, capsys, name):
    bundle = tmp_path / "derm_a"
    shutil.copytree(setup["bundle"], bundle)
    with open(bundle / name, "ab") as stream:
        stream.write(b" ")
    assert main(["verify", str(bundle)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"medfl verify: error: site 'derm_a': {bundle / name}: sha256 differs from the one the "
                            "metadata records") and len(error.splitlines()) == 1
    (bundle / name).unlink()
    assert main(["verify", str(bundle)]) == 1
    assert f"{bundle / name}: not found (the bundle's metadata lists it)" in capsys.readouterr().err


def test_metadata_that_points_outside_or_leaves_the_model_out_is_refused(setup, tmp_path, capsys):
    bundle = tmp_path / "derm_a"
    shutil.copytree(setup["bundle"], bundle)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    for hashes, expected in [({**metadata["sha256"], "../outside.txt": "0" * 64}, "lists '../outside.txt', which is "
                                                                                  "not a file of the bundle"),
                             ({k: v for k, v in metadata["sha256"].items() if k != "models/model.ts"},
                              "lists no sha256 for models/model.ts"),
                             ({"models/model.ts": "not a hash"}, "key 'sha256.models/model.ts'")]:
        (bundle / "configs" / "metadata.json").write_text(json.dumps({**metadata, "sha256": hashes}))
        assert main(["verify", str(bundle)]) == 1
        assert expected in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nothing")]) == 1
    assert "export or bundle folder not found" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 1  # holds derm_a, whose metadata is broken
    assert "key 'sha256.models/model.ts'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 1
    assert "neither an export nor a bundle" in capsys.readouterr().err
