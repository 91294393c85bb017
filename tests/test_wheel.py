"""The wheel a hospital installs: built offline, installed into a fresh virtual environment outside the
checkout, and used from a temporary folder (`synth`, `init`, `check`, a one-round `run` of the shipped example
experiment, `docs`); it carries every package, the recipes, the example configs, the docs and the license.
The transform recipes live in the top-level transforms/ folder, installed as the package medfl.recipes: the
wheel carries them, and an editable install (what `make` does) reads them from that folder.

The fresh environment has only medfl of its own; its other packages (torch, MONAI, ...) come from the test
environment through a .pth file that lists that environment's site-packages folders. A .pth line only
adds a folder to sys.path (the .pth files inside it, such as an editable install's finder, are not run), so
the checkout itself is not importable there; the test checks it.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"dermoscopy_train", "dermoscopy_eval", "prostate_train", "prostate_eval"}

pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def _test_environment_folders() -> list[str]:
    """The site-packages folders of the interpreter running the tests (its virtual environment's, if any)."""
    folders = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return list(dict.fromkeys(f for f in folders if Path(f).is_dir()))


def _source_copy(tmp_path: Path) -> Path:
    """What the wheel is made of, copied: the package, the recipes' and the docs' folders, pyproject.toml, the
    README and the license."""
    source = tmp_path / "source"
    for folder in ("medfl", "transforms", "docs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    return source


def _fresh_venv(tmp_path: Path, env: dict[str, str]) -> Path:
    """A virtual environment without pip or medfl; the test environment's packages reach it through a .pth
    file (added after the environment's own .pth files, whose names sort first)."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp_path, env).stdout.strip()
    (Path(purelib) / "_test_environment.pth").write_text("\n".join(_test_environment_folders()) + "\n")
    return python


def test_the_package_list_names_every_package_and_the_recipes() -> None:
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "medfl").rglob("__init__.py")}
    mapped = setuptools["package-dir"]
    assert setuptools["packages"] and sorted(setuptools["packages"]) == sorted(found | set(mapped))
    assert mapped["medfl.recipes"] == "transforms"
    assert (ROOT / "transforms" / "__init__.py").is_file()  # setuptools' editable installs map regular packages only
    assert {path.stem for path in (ROOT / "transforms").glob("*.yaml")} >= RECIPES


@pytest.mark.slow
def test_an_editable_install_reads_the_recipes_from_transforms(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = "1"
    source = _source_copy(tmp_path)
    python = _fresh_venv(tmp_path, env)  # the test environment's setuptools builds the editable install
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--no-build-isolation", "--disable-pip-version-check", "-q", "-e", str(source)], tmp_path, env)
    # Edited after the install, before anything reads it: one interpreter (MONAI's import is most of its cost)
    # finds the recipes in the folder itself, not in a copy the install made.
    recipe = source / "transforms" / "dermoscopy_eval.yaml"
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "description": "edited"}))
    work = tmp_path / "work"
    work.mkdir()
    code = ("import medfl, medfl.data.recipes as r\nprint(medfl.__file__)\nprint(r.RECIPES_DIR)\n"
            f"print(all(r.resolve_recipe(name, input_size=32)['transforms'] for name in {sorted(RECIPES)!r}))\n"
            "print(r.resolve_recipe('dermoscopy_eval')['description'])")
    lines = _run([str(python), "-c", code], work, env).stdout.splitlines()
    assert Path(lines[0]).resolve() == (source / "medfl" / "__init__.py").resolve()
    assert Path(lines[1]).resolve() == (source / "transforms").resolve() and lines[2] == "True"
    assert lines[3] == "edited"  # the folder itself, not a copy of it


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = "1"

    # Build from a copy of what the wheel is made of, so that the checkout gets no build/ folder.
    source = _source_copy(tmp_path)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", "-w", str(wheels), str(source)], tmp_path, env)
    (wheel,) = wheels.glob("medfl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        shipped = {Path(name).stem for name in names if name.startswith("medfl/recipes/")}
        docs = {name.removeprefix("medfl/docs/"): archive.read(name) for name in names if name.startswith("medfl/docs/")}
        (license_file,) = [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(license_file) == (ROOT / "LICENSE").read_bytes()
        metadata = archive.read(next(name for name in names if name.endswith(".dist-info/METADATA"))).decode()
    assert shipped >= RECIPES
    assert docs == {path.name: path.read_bytes() for path in (ROOT / "docs").glob("*.md")}
    assert "License-Expression: Apache-2.0" in metadata.splitlines() and "License-File: LICENSE" in metadata
    assert {f"medfl/examples/{task}/{name}" for task in ("dermoscopy", "prostate")
            for name in ("site.yaml", "experiment.yaml")} <= set(names)
    assert "medfl/data/shift_regimes.json" in names, "the shift sweep's figures that `medfl check` quotes"
    packages = {path.parent.relative_to(ROOT).as_posix() for path in (ROOT / "medfl").rglob("__init__.py")}
    assert packages <= {Path(name).parent.as_posix() for name in names}, "a package is missing from pyproject's list"

    # A fresh environment with nothing but the wheel; then the test environment's packages beside it.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", str(wheel)], tmp_path, env)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp_path, env).stdout.strip()
    (Path(purelib) / "_test_environment.pth").write_text("\n".join(_test_environment_folders()) + "\n")

    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(python), "-c", "import medfl, medfl.data.recipes as r; print(medfl.__file__); "
                  "print(r.RECIPES_DIR)"], work, env).stdout.split()
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where

    medfl = str(venv / ("Scripts/medfl.exe" if os.name == "nt" else "bin/medfl"))
    _run([medfl, "synth", "--out", "data", "--scale", "0.01", "--derm-sites", "2", "--prostate-sites", "0",
          "--min-per-class", "3,2,2"], work, env)
    configs = sorted(str(p.relative_to(work)) for p in (work / "data" / "site_configs").rglob("*.yaml"))
    assert len(configs) == 2
    checked = _run([medfl, "check", *configs, "--input-size", "32"], work, env)
    assert "2 of 2 site(s) ready" in checked.stdout
    assert "mean site shift: " in checked.stdout  # and the shipped figures were read: advice, or why there is none
    assert any(words in checked.stdout for words in ("no advice on which method fits", "At this shift", "could not tell"))

    # The shipped example experiment, its site pointed at a synthetic site: what `medfl init` tells a hospital.
    _run([medfl, "init", "start", "--task", "classification"], work, env)
    site = work / "start" / "dermoscopy" / "site.yaml"
    site.write_text(site.read_text().replace("FILL_IN_YOUR_DATA_FOLDER", str(work / "data" / "dermoscopy" / "derm_a")))
    assert "1 of 1 site(s) ready" in _run([medfl, "check", str(site)], work, env).stdout
    experiment = work / "start" / "dermoscopy" / "experiment.yaml"
    _run([medfl, "run", str(experiment), "--rounds", "1", "--out", "runs/wheel", "--quiet"], work, env)
    run_dir = work / "runs" / "wheel"
    assert (run_dir / "summary.json").is_file() and (run_dir / "metrics.csv").is_file()

    printed = _run([medfl, "docs", "install"], work, env).stdout
    assert printed == (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    assert "site-config" in _run([medfl, "docs"], work, env).stdout
