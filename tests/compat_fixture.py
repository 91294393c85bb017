"""Write the run folder and export that tests/test_compat.py reads with today's code.

Run folders and exports outlive the medfl that wrote them: a hospital exports, predicts and evaluates with a
newer medfl than the one the federation ran. This script makes tiny ones with the checked-out medfl, through
the `medfl` command as a user would:

    python tests/compat_fixture.py tests/data/compat_6c92377     # made at commit 6c92377

Under that folder: `run/` (2 dermoscopy sites, 32 px, slim VGG-16 x0.03125, prr, 1 round of 3 epochs; without its
TensorBoard events and the sites' restart states, which no command but `run --resume` reads), `export/`
(`medfl export` of derm_a), `samples/` (two labelled images of each class as a site folder of their own, with
`site.yaml`) and `expected/` (what `medfl predict`, `medfl evaluate` and `medfl report` wrote from them). The
data the run trained on is made with `medfl synth` in a temporary folder and not kept: the run folder names
site configs that no longer exist, as at a hospital that receives a run folder.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.gettempdir()) / "medfl_compat_fixture"  # fixed, so that the paths it records are plain
SITES = ("derm_a", "derm_b")
EXPORTED = "derm_a"
EXPERIMENT = {
    "name": "compat_dermoscopy", "task": "classification", "method": "prr", "rounds": 1, "local_epochs": 3,
    "batch_size": 8, "seed": 0, "device": "cpu", "runtime": {"threads": 1},
    "data": {"classes": ["nv", "bkl", "mel"], "input_size": 32, "num_workers": 0},
    # slim VGG-16 needs 32 px; the narrowest width keeps the files small, 3 epochs of Adam make one round tell inputs apart
    "model": {"name": "slim_vgg16", "width": 0.03125}, "optimizer": {"name": "adam", "lr": 0.01},
}


def medfl(*args: str | Path) -> None:
    """The `medfl` command of this checkout, one thread, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
    code = "import sys, medfl.cli; sys.exit(medfl.cli.main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, env=env)


def samples(federation: Path, out: Path) -> Path:
    """Two labelled images of each class of derm_a as a csv-layout site folder of its own; its site config."""
    configs = federation / "site_configs" / "dermoscopy"
    config = yaml.safe_load((configs / f"{EXPORTED}.yaml").read_text())
    root = (configs / config["data_root"]).resolve()
    with open(root / config["table"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    label_map = config["label_map"]
    (out / "images").mkdir(parents=True)
    kept: list[dict[str, str]] = []
    for row in rows:  # in the table's order
        images = list(root.rglob(f"{row['image_id']}.jpg"))
        if not label_map.get(row["dx"]) or not images or sum(k["label"] == row["dx"] for k in kept) >= 2:
            continue
        shutil.copyfile(images[0], out / "images" / images[0].name)
        kept.append({"image": f"images/{images[0].name}", "label": row["dx"], "lesion_id": row["lesion_id"]})
    with open(out / "labels.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["image", "label", "lesion_id"])
        writer.writeheader()
        writer.writerows(kept)
    site = {"name": "samples", "task": "classification", "data_root": ".", "layout": "csv",
            "label_map": {label: label_map[label] for label in sorted({row["label"] for row in kept})}}
    (out / "site.yaml").write_text(yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    return out / "site.yaml"


def main(target: str) -> None:
    sys.path.insert(0, str(REPOSITORY))
    from medfl.synth import Minimums, generate

    if Path(target).exists():
        raise SystemExit(f"{target} exists: remove it first")
    shutil.rmtree(WORK, ignore_errors=True)
    federation = WORK / "federation"
    generate(federation, scale=0.01, n_derm=len(SITES), n_prostate=1, minimums=Minimums(6, 3, 3))
    work = WORK / "fixture"
    run, export, expected = work / "run", work / "export", work / "expected"
    work.mkdir(parents=True)
    experiment = WORK / "experiment.yaml"
    sites = [str(federation / "site_configs" / "dermoscopy" / f"{site}.yaml") for site in SITES]
    experiment.write_text(yaml.safe_dump({**EXPERIMENT, "sites": sites}, sort_keys=False), encoding="utf-8")
    medfl("run", experiment, "--out", run)
    medfl("export", run, "--site", EXPORTED, "--out", export)
    site_config = samples(federation, work / "samples")
    images = sorted((work / "samples" / "images").glob("*.jpg"))
    medfl("predict", export, *images, "--out", expected / "predict")
    medfl("evaluate", export, site_config, "--split", "all", "--out", expected / "evaluate.json")
    medfl("report", run, "--out", expected / "report")
    for figure in (expected / "report").glob("*.png"):  # report.md is what the tests compare
        figure.unlink()
    shutil.rmtree(run / "tensorboard")  # derived from metrics.csv; no medfl command reads it
    for state in run.glob("sites/*/state_round_*.pt"):  # restart states: only `medfl run --resume` reads them
        state.unlink()
    shutil.copytree(work, target)
    shutil.rmtree(WORK)


if __name__ == "__main__":
    main(sys.argv[1])
