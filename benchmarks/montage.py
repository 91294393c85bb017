"""Montage of every synthetic site's images as the networks see them: one row per site, mild and realistic.

Generates both presets of `medfl synth` (small scale) in a temporary folder unless `--data` names folders
written earlier, reads every site with medfl's own reader, and passes dermoscopy images through the shipped
evaluation recipe (`dermoscopy_eval`: decode, area resize to the input size, ImageNet normalisation, undone
for display) and prostate slices through medfl's volume preprocessing (percentile clip, z-score, in-plane
resize), shown in one common window of z-scores. So what differs between rows here is what survives into
training.

    python benchmarks/montage.py                      # 32 px dermoscopy, 64 px prostate
    python benchmarks/montage.py --size 48            # another dermoscopy input size
    python benchmarks/montage.py --smoke              # 2 tiny sites per task and preset, nothing kept (the suite)

Writes benchmarks/results/montage.dermoscopy.<size>px.png and montage.prostate.<size>px.png.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medfl.config import DataSettings, load_site_config  # noqa: E402
from medfl.data import build_dataset, load_recipe, load_site  # noqa: E402
from medfl.synth import Minimums, generate  # noqa: E402
from medfl.synth.lesions import CLASSES  # noqa: E402
from medfl.tasks import task_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("mild", "realistic")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_SD = np.array([0.229, 0.224, 0.225])
Z_WINDOW = (-2.0, 4.0)  # z-scores shown black to white, the same for every site
# --smoke: two sites per task and preset with the fewest images and cases synth allows; montages to a removed folder.
SMOKE = {"scale": 0.01, "n_derm": 2, "n_prostate": 2, "minimums": Minimums(train=1, val=1, test=1, cases=3)}


def dermoscopy_row(config: Path, size: int, per_class: int) -> list[tuple[np.ndarray, str]]:
    """`per_class` training images of each class, as the evaluation recipe gives them, back in [0, 1] RGB."""
    site = load_site(load_site_config(config), DataSettings(classes=list(CLASSES), input_size=size, num_workers=1),
                     task=task_for("classification"))
    records = sorted(site.splits["train"], key=lambda r: r["id"])
    chosen = [r for c in range(len(CLASSES)) for r in [r for r in records if r["label"] == c][:per_class]]
    dataset = build_dataset(chosen, load_recipe("dermoscopy_eval", input_size=size), cache_rate=0)
    tiles = []
    for record, item in zip(chosen, dataset, strict=True):
        image = np.asarray(item["image"]).transpose(1, 2, 0) * IMAGENET_SD + IMAGENET_MEAN
        tiles.append((np.clip(image, 0, 1), CLASSES[record["label"]]))
    return tiles


def prostate_row(config: Path, size: int, count: int) -> list[tuple[np.ndarray, str]]:
    """The slice through the middle of the gland of `count` cases (all splits), as medfl preprocesses them."""
    site = load_site(load_site_config(config), DataSettings(input_size=size, num_workers=1),
                     task=task_for("segmentation"))
    by_case: dict[str, list[dict]] = {}
    for records in site.splits.values():
        for record in records:
            by_case.setdefault(record["case_id"], []).append(record)
    tiles = []
    for case in sorted(by_case)[:count]:
        with_gland = sorted((r for r in by_case[case] if np.any(r["label"])), key=lambda r: r["slice_index"])
        record = with_gland[len(with_gland) // 2]
        image = (np.asarray(record["image"][0]) - Z_WINDOW[0]) / (Z_WINDOW[1] - Z_WINDOW[0])
        tiles.append((np.clip(image, 0, 1), case))
    return tiles


def draw(rows: dict[str, dict[str, list[tuple[np.ndarray, str]]]], title: str, path: Path) -> None:
    """One row per site, the presets side by side; pixels shown as nearest-neighbour blocks."""
    sites = list(next(iter(rows.values())))
    columns = max(len(tiles) for preset in rows.values() for tiles in preset.values())
    figure, axes = plt.subplots(len(sites), 2 * columns + 1, figsize=(0.75 * (2 * columns + 1), 0.9 * len(sites)),
                                gridspec_kw={"width_ratios": [1] * columns + [0.25] + [1] * columns})
    for row, site in enumerate(sites):
        for block, preset in enumerate(PRESETS):
            tiles = rows[preset][site]
            for column in range(columns):
                axis = axes[row, column + block * (columns + 1)]
                axis.set_xticks([])
                axis.set_yticks([])
                if column < len(tiles):
                    image, label = tiles[column]
                    axis.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                    if row == 0 or label in CLASSES:
                        axis.set_title(label, fontsize=6, pad=2)
                else:
                    axis.axis("off")
            if block == 0:
                axes[row, 0].set_ylabel(site, fontsize=7)
        axes[row, columns].axis("off")
    for block, preset in enumerate(PRESETS):
        axes[0, block * (columns + 1) + columns // 2].annotate(
            preset, (0.5, 1.6), xycoords="axes fraction", ha="center", fontsize=9, weight="bold")
    figure.suptitle(title, fontsize=9, y=0.995)
    figure.tight_layout(pad=0.3, h_pad=0.6, w_pad=0.1)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="dermoscopy input size (px)")
    parser.add_argument("--prostate-size", type=int, default=64, help="prostate input size (px)")
    parser.add_argument("--scale", type=float, default=0.05, help="synthetic data scale")
    parser.add_argument("--per-class", type=int, default=3, help="dermoscopy images per class and site")
    parser.add_argument("--cases", type=int, default=8, help="prostate cases per site")
    parser.add_argument("--data", type=Path, help="folder holding mild/ and realistic/ written earlier")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true",
                        help="2 tiny sites per task and preset, 1 image per class, 2 cases; montages to a removed folder")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            args.per_class, args.cases, args.data, args.out = 1, 2, None, Path(tmp) / "results"
            return montages(args, SMOKE)
    return montages(args, {"scale": args.scale})


def montages(args: argparse.Namespace, synth: dict) -> int:
    """Generate (unless --data) and draw both montages into args.out; `synth`: medfl.synth.generate's arguments."""
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        for preset in PRESETS:
            if args.data is None:
                generate(data / preset, shift=preset, **synth)
        derm = {preset: {config.stem: dermoscopy_row(config, args.size, args.per_class)
                         for config in sorted((data / preset / "site_configs/dermoscopy").glob("*.yaml"))}
                for preset in PRESETS}
        prostate = {preset: {config.stem: prostate_row(config, args.prostate_size, args.cases)
                             for config in sorted((data / preset / "site_configs/prostate").glob("*.yaml"))}
                    for preset in PRESETS}
    args.out.mkdir(parents=True, exist_ok=True)
    draw(derm, f"dermoscopy training images at {args.size} px (nv, bkl, mel per site; evaluation recipe)",
         args.out / f"montage.dermoscopy.{args.size}px.png")
    draw(prostate, f"prostate slices at {args.prostate_size} px (mid-gland, z-scores {Z_WINDOW[0]:g} to "
         f"{Z_WINDOW[1]:g})", args.out / f"montage.prostate.{args.prostate_size}px.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
