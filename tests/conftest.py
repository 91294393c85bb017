"""Shared fixtures: tiny site folders in every layout medfl reads, built in a temporary folder.

Each `*_site` fixture is a factory: call it (with overrides) to write a data folder and its site config,
and get the config's path back. Images are 24 x 24 JPEGs, volumes a few slices of 20 x 24 voxels.
"""

from __future__ import annotations

import contextlib
import csv
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from PIL import Image

from medfl.environment import prefer_passive_openmp_waiting

# Before any test module imports torch: `import medfl` no longer sets it (the `medfl` command does).
prefer_passive_openmp_waiting()

HAM_LABEL_MAP = {"nv": "nv", "bkl": "bkl", "mel": "mel", "akiec": None, "bcc": None, "df": None, "vasc": None}
ISIC_COLUMNS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
ISIC_LABEL_MAP = {"NV": "nv", "BKL": "bkl", "MEL": "mel", "BCC": None, "AK": None, "DF": None, "VASC": None,
                  "SCC": None, "UNK": None}


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (24, 24)) -> Path:
    """A small random RGB JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def default_derm_rows(lesions_per_class: int = 10) -> list[tuple[str, str, str]]:
    """(image id, label, lesion id): nv/bkl/mel lesions (every third with two images), plus 2 akiec rows."""
    rows = []
    for label in ("nv", "bkl", "mel"):
        for k in range(lesions_per_class):
            lesion = f"HAM_{label}{k:03d}"
            rows.append((f"ISIC_{label}{k:03d}a", label, lesion))
            if k % 3 == 0:
                rows.append((f"ISIC_{label}{k:03d}b", label, lesion))
    rows += [("ISIC_akiec000", "akiec", "HAM_akiec000"), ("ISIC_akiec001", "akiec", "HAM_akiec001")]
    return rows


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a site config mapping as YAML under tmp_path/configs/ and return its path."""

    def write(data: dict[str, Any], name: str | None = None) -> Path:
        path = tmp_path / "configs" / (name or f"{data.get('name', 'site')}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture
def ham10000_site(tmp_path: Path, write_config: Callable[..., Path]) -> Callable[..., Path]:
    """Factory: a HAM10000 folder (images split over two part folders, `dataset` column) and its config."""

    def make(rows: Sequence[tuple[str, str, str]] | None = None, name: str = "derm_a",
             dataset: Callable[[int], str] = lambda i: "vidir_modern", **config: Any) -> Path:
        rows = list(rows if rows is not None else default_derm_rows())
        root = tmp_path / "data" / name
        table = [(lesion, image, label, "histo", 50, "male", "back", dataset(i))
                 for i, (image, label, lesion) in enumerate(rows)]
        write_csv(root / "HAM10000_metadata.csv",
                  ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"], table)
        for i, (image, _, _) in enumerate(rows):
            write_jpeg(root / f"HAM10000_images_part_{1 + i % 2}" / f"{image}.jpg", seed=i)
        data = {"name": name, "task": "classification", "data_root": f"../data/{name}", "layout": "ham10000",
                "label_map": dict(HAM_LABEL_MAP), **config}
        return write_config(data)

    return make


@pytest.fixture
def isic2019_site(tmp_path: Path, write_config: Callable[..., Path]) -> Callable[..., Path]:
    """Factory: an ISIC 2019 folder (one-hot ground truth, metadata with lesion ids, some `_downsampled`)."""

    def make(rows: Sequence[tuple[str, str, str]] | None = None, name: str = "derm_isic", **config: Any) -> Path:
        rows = list(rows if rows is not None else default_derm_rows())
        root = tmp_path / "data" / name
        truth, metadata = [], []
        for i, (image, label, lesion) in enumerate(rows):
            column = {"akiec": "AK"}.get(label, label.upper())
            image_id = f"{image}_downsampled" if i % 4 == 0 else image
            truth.append([image_id] + ["1.0" if c == column else "0.0" for c in ISIC_COLUMNS])
            metadata.append([image_id, 45, "anterior torso", lesion if i % 5 else "", "female"])
            write_jpeg(root / "ISIC_2019_Training_Input" / f"{image_id}.jpg", seed=i)
        write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC_COLUMNS], truth)
        write_csv(root / "ISIC_2019_Training_Metadata.csv",
                  ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], metadata)
        data = {"name": name, "task": "classification", "data_root": f"../data/{name}", "layout": "isic2019",
                "label_map": dict(ISIC_LABEL_MAP), **config}
        return write_config(data)

    return make


@pytest.fixture
def csv_site(tmp_path: Path, write_config: Callable[..., Path]) -> Callable[..., Path]:
    """Factory: a generic `labels.csv` folder with free-text labels and image paths in subfolders."""

    def make(rows: Sequence[tuple[str, str, str]] | None = None, name: str = "derm_csv", **config: Any) -> Path:
        rows = list(rows if rows is not None else default_derm_rows())
        root = tmp_path / "data" / name
        names = {"nv": "naevus", "bkl": "keratosis", "mel": "melanoma", "akiec": "actinic"}
        table = []
        for i, (image, label, lesion) in enumerate(rows):
            relative = f"{label}/{image}.jpg"
            write_jpeg(root / relative, seed=i)
            table.append([relative, names.get(label, label), lesion])
        write_csv(root / "labels.csv", ["image", "label", "lesion_id"], table)
        data = {"name": name, "task": "classification", "data_root": f"../data/{name}", "layout": "csv",
                "label_map": {"naevus": "nv", "keratosis": "bkl", "melanoma": "mel", "actinic": None}, **config}
        return write_config(data)

    return make


def phantom_case(depth: int = 6, height: int = 20, width: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) arrays in (z, y, x) order: noise plus a bright box, the box's middle slices as prostate."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, (depth, height, width)).astype(np.float32)
    mask = np.zeros((depth, height, width), dtype=np.uint8)
    mask[1 : depth - 2, 6:14, 8:16] = 1
    mask[2, 8:10, 10:12] = 2  # a second zone: every value > 0 is prostate
    image[mask > 0] += 80.0
    return image, mask


def write_volume(path: Path, array: np.ndarray, spacing: Sequence[float] = (0.6, 0.6, 3.0),
                 origin: Sequence[float] = (0.0, 0.0, 0.0),
                 direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    """Write a (z, y, x) array with SimpleITK (NIfTI or MetaImage by extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in direction])
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def prostate_site(tmp_path: Path, write_config: Callable[..., Path]) -> Callable[..., Path]:
    """Factory: NIfTI or MetaImage cases with masks (non-contiguous ids, mixed suffix case) and their config."""

    def make(layout: str = "nifti", cases: Sequence[str] = ("Case00", "Case02", "Case05", "Case07", "Case11",
                                                          "Case12", "Case20", "Case31"),
             name: str = "prost_a", depth: int = 6, **config: Any) -> Path:
        root = tmp_path / "data" / name
        extension = ".nii.gz" if layout == "nifti" else ".mhd"
        for i, case in enumerate(cases):
            image, mask = phantom_case(depth=depth, seed=i)
            suffix = "_Segmentation" if i % 3 == 1 else "_segmentation"
            write_volume(root / f"{case}{extension}", image)
            write_volume(root / f"{case}{suffix}{extension}", mask)
        data = {"name": name, "task": "segmentation", "data_root": f"../data/{name}", "layout": layout, **config}
        return write_config(data)

    return make


# ---- a tiny synthetic federation, for end-to-end runs --------------------------------------------------------

TINY_DERM_SITES = ("derm_a", "derm_b")
TINY_PROSTATE_SITES = ("prost_a", "prost_b")
_TINY_BASE = {"rounds": 2, "local_epochs": 1, "cpa": {"warmup_rounds": 1}}
_TINY_TASKS = {
    "classification": ("dermoscopy", {"classes": ["nv", "bkl", "mel"]}, {"name": "slim_vgg16", "width": 0.125}, 16),
    "segmentation": ("prostate", {"slices": "foreground", "empty_slice_fraction": 0.1}, {"name": "unet", "width": 0.25}, 8),
}


def tiny_federation_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`medfl synth` at scale 0.01 (2 dermoscopy and 2 prostate sites), written once per test process.

    Tests only read it: their configs and runs go to their own folders."""
    from medfl.synth import Minimums, generate

    root = tmp_path_factory.getbasetemp() / "tiny_federation"
    if not (root / "done").exists():
        generate(root, scale=0.01, n_derm=2, n_prostate=2, minimums=Minimums(6, 3, 3))
        (root / "done").touch()
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Runs set torch's thread count to their config's (1), and tiny networks on a shared 2-core machine run
    fastest on one thread anyway: one thread for the module, the test process's count back afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_federation_root(tmp_path_factory)


def tiny_experiment(path: Path, federation: Path, task: str, sites: Sequence[str] | None = None,
                    **changes: Any) -> Path:
    """Write a tiny experiment config at `path` and return it: 32 px inputs, slim VGG-16 x0.125 (classification)
    or UNet x0.25 (segmentation), 2 rounds x 1 epoch, CPA warm-up 1. `changes` replace top-level entries;
    `data` and `model` are merged into the defaults."""
    folder, data, model, batch_size = _TINY_TASKS[task]
    sites = sites or (TINY_DERM_SITES if task == "classification" else TINY_PROSTATE_SITES)
    config = {
        "name": f"tiny_{folder}", "task": task, **_TINY_BASE, "batch_size": batch_size,
        "sites": [str(federation / "site_configs" / folder / f"{site}.yaml") for site in sites],
        **changes,
        "data": {"input_size": 32, "num_workers": 0, **data, **changes.get("data", {})},
        "model": {**model, **changes.get("model", {})},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_3d_experiment(path: Path, federation: Path, method: str, **changes: Any) -> Path:
    """Write a tiny 3-D prostate experiment (data.dims 3) on `federation`'s prost_a and prost_b at `path`: 1 round
    x 1 epoch, 6 mm voxels, 16 x 16 x 8 patches, a 3-level UNet x0.125, one thread on the CPU. `changes` replace
    top-level entries."""
    config = {"name": "tiny3d", "task": "segmentation", "method": method, "rounds": 1, "local_epochs": 1,
              "batch_size": 2, "sites": [str(federation / "site_configs" / "prostate" / f"prost_{s}.yaml") for s in "ab"],
              "data": {"dims": 3, "spacing": [6.0, 6.0, 6.0], "patch_size": [16, 16, 8], "patches_per_volume": 1,
                       "num_workers": 0},
              "model": {"name": "unet", "width": 0.125,
                        "options": {"channels": [16, 32, 64], "strides": [2, 2], "num_res_units": 1}},
              "evaluation": {"sw_mode": "gaussian"}, "optimizer": {"name": "adam", "lr": 1e-3},
              "cpa": {"warmup_rounds": 0}, "device": "cpu", "runtime": {"threads": 1}, **changes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


# ---- another process holding a folder's lock --------------------------------------------------------------

@contextlib.contextmanager
def held_by_another_process(folder: Path, lock_file: str, signals: Path) -> Iterator[int]:
    """A child process holds `folder`'s FolderLock (made when missing) for the block; yields its PID. It says
    it holds the lock with a file in `signals` and lets go when the test writes another (no sleeps)."""
    signals.mkdir(parents=True, exist_ok=True)
    holding, done = signals / f"holding-{lock_file}", signals / f"done-{lock_file}"
    code = ("import pathlib, time\nfrom medfl.runfolder import FolderLock\n"
            f"FolderLock({str(folder)!r}, {lock_file!r}, 'none', create=True).acquire()\n"
            f"pathlib.Path({str(holding)!r}).touch()\n"
            f"while not pathlib.Path({str(done)!r}).exists():\n    time.sleep(0.01)\n")
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_for_files([holding], [process])
        yield process.pid
    finally:
        done.touch()
        process.wait(timeout=60)


def wait_for_files(paths: Sequence[Path], processes: Sequence[subprocess.Popen], timeout: float = 300) -> None:
    """Wait until every file of `paths` exists; fail at once when one of `processes` ends first."""
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        ended = [process.args for process in processes if process.poll() is not None]
        assert not ended, f"ended before it was ready: {ended}"
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.01)


# ---- saved torch files ------------------------------------------------------------------------------------

def tensors(value, path=""):
    """Every tensor inside a loaded torch file, by its path."""
    import torch

    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors(item, f"{path}/{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from tensors(item, f"{path}/{index}")


# ---- finished tiny runs, shared across modules ------------------------------------------------------------

_TINY_RUN_SUMMARIES: dict[str, dict[str, Any]] = {}


def tiny_run(tmp_path_factory: pytest.TempPathFactory, task: str, **changes: Any) -> tuple[Path, dict[str, Any]]:
    """(run folder, the summary its run returned) of a finished run of `tiny_experiment(task, **changes)` on the
    tiny federation, on one thread. Each distinct experiment (its resolved config, but for where it was written)
    runs once per test process, so tests of any module that only read such a run share it: copy it before changing
    anything in it."""
    import hashlib
    import json

    import torch

    from medfl.experiment import load_experiment_config
    from medfl.federated.coordinator import Coordinator
    from medfl.tasks import task_for

    root = tmp_path_factory.getbasetemp() / "tiny_runs"
    draft = tiny_experiment(root / "draft.yaml", tiny_federation_root(tmp_path_factory), task, **changes)
    config = load_experiment_config(draft)
    settings = {k: v for k, v in config.resolved().items() if k != "output_dir"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if key not in _TINY_RUN_SUMMARIES:
        folder = root / key / "run"
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # two cores shared by many: one thread each is fastest
        try:
            _TINY_RUN_SUMMARIES[key] = Coordinator(config, folder, torch.device("cpu"), task=task_for(config.task)).run()
        finally:
            torch.set_num_threads(previous)
    return root / key / "run", _TINY_RUN_SUMMARIES[key]
