"""Is the synthetic dermoscopy task learnable but not trivial, and does pooling sites help?

Generates the default synthetic federation (`medfl synth` defaults, dermoscopy only) in a temporary folder,
reads every site with medfl's own reader (`load_site`: 70/10/20 split by lesion, stratified by class), then trains a width-reduced slim VGG-16
(a) on each site alone and (b) on all sites' training images pooled, picks the epoch with the best validation
macro-F1 and reports every site's test macro-F1. Repeated over a few training seeds; the data stay fixed.

The generator is tuned so that single-site models stay clearly below perfect while pooled training is better.
Run: `python benchmarks/synth_learnability.py` (about 2-4 minutes on 2 CPU cores). Writes
benchmarks/results/synth_learnability.{json,md}. `--smoke`: 2 tiny sites, 1 epoch, 1 seed, results in a temporary
folder that is removed (the suite runs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import f1_score

from medfl.config import DataSettings, load_site_config
from medfl.data import load_site
from medfl.models import build_model
from medfl.synth import Minimums, generate
from medfl.synth.lesions import CLASSES
from medfl.tasks import task_for

RESULTS = Path(__file__).resolve().parent / "results"
# --smoke: two sites with the fewest images synth allows, one epoch of one seed.
SMOKE = {"sites": 2, "minimums": Minimums(train=1, val=1, test=1), "scale": 0.01, "epochs": 1, "repeats": 1}


def load_images(config: Path, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A site's images resized to `size`, and labels, per split, as medfl's reader splits them."""
    site = load_site(load_site_config(config), DataSettings(classes=list(CLASSES), input_size=size),
                     task=task_for("classification"))
    splits = {}
    for name, records in site.splits.items():
        images = []
        for record in records:
            with Image.open(record["image"]) as image:
                pixels = np.asarray(
                    image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32
                )
            images.append((pixels / 255.0 - 0.5) / 0.25)
        labels = torch.tensor([record["label"] for record in records])
        splits[name] = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels)
    return splits


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations: lesions have no canonical orientation."""
    if torch.rand(1, generator=generator) < 0.5:
        batch = batch.flip(3)
    return torch.rot90(batch, int(torch.randint(4, (1,), generator=generator)), dims=(2, 3)).contiguous()


def _predict(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        logits, _ = model(images)
    return logits.argmax(1).numpy()


def macro_f1(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Macro-F1 over the three classes."""
    return float(f1_score(data[1].numpy(), _predict(model, data[0]), average="macro", labels=[0, 1, 2]))


def train(
    train_set: tuple[torch.Tensor, torch.Tensor],
    val_set: tuple[torch.Tensor, torch.Tensor],
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]],
    args: argparse.Namespace,
    seed: int,
) -> dict[str, float]:
    """Train with class-weighted cross-entropy; test macro-F1 per site at the best validation epoch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model("slim_vgg16", "classification", len(CLASSES), 3, width=args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    counts = torch.bincount(train_set[1], minlength=len(CLASSES)).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (len(CLASSES) * counts.clamp(min=1)))
    best_val, best_tests = -1.0, {}
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_set[1]), generator=generator)
        for start in range(0, len(order), args.batch):
            index = order[start : start + args.batch]
            if len(index) < 2:
                continue
            logits, _ = model(_augment(train_set[0][index], generator))
            loss = loss_fn(logits, train_set[1][index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val = macro_f1(model, val_set)
        if val > best_val:
            best_val, best_tests = val, {name: macro_f1(model, data) for name, data in tests.items()}
    return best_tests


def _cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="data seed (medfl synth --seed)")
    parser.add_argument("--scale", type=float, default=0.1, help="medfl synth --scale")
    parser.add_argument("--size", type=int, default=32, help="input size in pixels")
    parser.add_argument("--width", type=float, default=0.25, help="slim VGG-16 width multiplier")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--repeats", type=int, default=3, help="training seeds per setting")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results")
    parser.add_argument("--smoke", action="store_true",
                        help="2 tiny sites, 1 epoch, 1 seed; results to a temporary folder that is removed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            args.scale, args.epochs, args.repeats, args.out = SMOKE["scale"], SMOKE["epochs"], SMOKE["repeats"], Path(tmp)
            return measure(args, {"n_derm": SMOKE["sites"], "minimums": SMOKE["minimums"]})
    return measure(args, {"n_derm": 4})


def measure(args: argparse.Namespace, sites: dict) -> int:
    """Single-site and pooled training of every seed; the table printed and (unless --no-write) written."""
    start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        synth = generate(tmp, seed=args.seed, scale=args.scale, n_prostate=0, **sites)
        sites = {path.stem: load_images(path, args.size) for path in synth.configs}
    tests = {name: data["test"] for name, data in sites.items()}
    single: dict[str, list[float]] = {name: [] for name in sites}
    pooled: dict[str, list[float]] = {name: [] for name in sites}
    for repeat in range(args.repeats):
        for name, data in sites.items():
            single[name].append(train(data["train"], data["val"], {name: data["test"]}, args, repeat)[name])
        pooled_train = _cat([data["train"] for data in sites.values()])
        pooled_val = _cat([data["val"] for data in sites.values()])
        for name, value in train(pooled_train, pooled_val, tests, args, repeat).items():
            pooled[name].append(value)

    rows = []
    for name, data in sites.items():
        counts = Counter(CLASSES[i] for i in data["train"][1].tolist())
        rows.append(
            {
                "site": name,
                "train_counts": {cls: counts[cls] for cls in CLASSES},
                "test_images": len(data["test"][1]),
                "single_f1": statistics.mean(single[name]),
                "single_f1_sd": statistics.pstdev(single[name]),
                "pooled_f1": statistics.mean(pooled[name]),
                "pooled_f1_sd": statistics.pstdev(pooled[name]),
            }
        )
    summary = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("no_write", "out", "smoke")},
        "model": f"slim_vgg16 width {args.width}",
        "sites": rows,
        "mean_single_f1": statistics.mean(r["single_f1"] for r in rows),
        "mean_pooled_f1": statistics.mean(r["pooled_f1"] for r in rows),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    lines = [
        "# Synthetic dermoscopy: single-site vs pooled training",
        "",
        f"Test macro-F1 (mean ± sd over {args.repeats} training seeds), {summary['model']}, "
        f"{args.size}px, {args.epochs} epochs, best validation epoch; data seed {args.seed}, scale {args.scale}.",
        "",
        "| site | train nv/bkl/mel | test images | single site | pooled |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        train_counts = "/".join(str(r["train_counts"][c]) for c in CLASSES)
        lines.append(
            f"| {r['site']} | {train_counts} | {r['test_images']} | {r['single_f1']:.3f} ± {r['single_f1_sd']:.3f} "
            f"| {r['pooled_f1']:.3f} ± {r['pooled_f1_sd']:.3f} |"
        )
    lines += [
        f"| mean | | | {summary['mean_single_f1']:.3f} | {summary['mean_pooled_f1']:.3f} |",
        "",
        f"{summary['seconds']} s, torch {torch.__version__}, {args.threads} threads.",
        "",
    ]
    print("\n".join(lines))
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "synth_learnability.json").write_text(json.dumps(summary, indent=2) + "\n")
        (args.out / "synth_learnability.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
