"""Does the synthetic site shift make FedAvg's average collapse, and is the collapse normalisation statistics?

A one-round FedAvg probe on each preset of `medfl synth --shift`: from the seeded common initialisation
(torch.manual_seed(seed), then build_model, as medfl does), every site trains its own copy for one round of
E = 5 local epochs (at least 200 local steps at the smallest site at the benchmark's scale: dermoscopy scale
0.6, prostate 3.3), then on every site's validation split we score
- local: the site's own model after the round;
- fedavg: the sample-weighted mean of all sites' state dicts, BatchNorm running statistics included (as medfl's
  FedAvg does: medfl.federated.averaging);
- fedavg+bn: that average with its BatchNorm statistics re-estimated on the site's own training images (eval
  recipe, no augmentation; cumulative average over one pass, weights unchanged).
Dermoscopy: macro-F1 (medfl.metrics), slim VGG-16 x0.25 bias-free at 32 px, batch 16, cross-entropy (FedAvg's
loss in medfl), the reference's plain SGD (lr 1e-2, no momentum, weight decay 1e-6) and Adam (lr 2e-3).
Prostate: foreground Dice per validation case (medfl.metrics), UNet x0.5 at 64 px, batch 8, CE + Dice, Adam
lr 1e-3 (the shipped experiment's), with its default instance norm (no running statistics: nothing to
re-estimate) and with `norm: batch`. The test split is never read.

`--warm-rounds W` probes round W instead of round 0: the common start is then the FedAvg model after W rounds of
`--warm-epochs` local epochs, which every site holds at the start of round W of a FedAvg federation. Round 0
averages models that trained apart from a random initialisation, which says little about site shift: compare
the two in calibration.md.

Every invocation appends its attempts (the sites' full parameter set, the probe's settings, every score) to
benchmarks/results/calibration.json and rewrites calibration.md from all attempts, so the record keeps every
parameter set tried. One torch thread. Generated data are kept in results/tmp/calibration/ (the realistic
prostate sites at scale 3.3 take 1.3 GB and about 4.5 minutes to write).

    python benchmarks/calibrate_shift.py --task dermoscopy                  # both presets, SGD and Adam, 3 seeds
    python benchmarks/calibrate_shift.py --task dermoscopy --warm-rounds 3  # probe round 3
    python benchmarks/calibrate_shift.py --task prostate --norms instance,batch
    python benchmarks/calibrate_shift.py --smoke    # both tasks on tiny data, nothing kept (the suite runs it)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfl.config import DataSettings, load_site_config
from medfl.data import build_dataset, load_recipe, load_site
from medfl.data.tensors import plain_tensors
from medfl.experiment import CPASettings
from medfl.federated.averaging import average_states, normalise_site_weights
from medfl.federated.site import derive_seed
from medfl.federated.training import EpochPlan, train_epoch
from medfl.metrics import classification_metrics, reassemble_volumes, segmentation_case_metrics
from medfl.models import build_model
from medfl.synth import Minimums, generate
from medfl.synth.lesions import CLASSES
from medfl.synth.realistic import REALISTIC_DERM, REALISTIC_PROSTATE, SHIFTS
from medfl.synth.sites import REFERENCE_DERM, REFERENCE_PROSTATE
from medfl.tasks import Task, task_for

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
DATA = RESULTS / "tmp" / "calibration"
SITE_TABLES = {"mild": {"dermoscopy": REFERENCE_DERM, "prostate": REFERENCE_PROSTATE},
               "realistic": {"dermoscopy": REALISTIC_DERM, "prostate": REALISTIC_PROSTATE}}
OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 1e-2, "momentum": 0.0, "weight_decay": 1e-6},
    "adam": {"name": "adam", "lr": 2e-3, "weight_decay": 1e-6},
}
PROSTATE_OPTIMIZER = {"name": "adam", "lr": 1e-3, "weight_decay": 1e-6}


def optimizer_variants(args: argparse.Namespace) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Dermoscopy's variants: the optimizers named by --optimizers, default network options."""
    return {name: (OPTIMIZERS[name], {}) for name in args.optimizers.split(",")}


def norm_variants(args: argparse.Namespace) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Prostate's variants: Adam, the UNet with each norm named by --norms."""
    return {f"adam, {norm} norm": (PROSTATE_OPTIMIZER, {} if norm == "instance" else {"norm": norm})
            for norm in args.norms.split(",")}


# The benchmark's tasks (--task): medfl's task, the data settings, network, batch, default data scale, the synthetic
# sites to write and the variants probed.
TASKS = {
    "dermoscopy": {"task": task_for("classification"), "input_size": 32, "batch": 16, "model": "slim_vgg16",
                   "width": 0.25, "data": {"classes": list(CLASSES)}, "scale": 0.6,
                   "sites": {"n_derm": 4, "n_prostate": 0}, "variants": optimizer_variants},
    "prostate": {"task": task_for("segmentation"), "input_size": 64, "batch": 8, "model": "unet", "width": 0.5,
                 "data": {"slices": "foreground", "empty_slice_fraction": 0.2}, "scale": 3.3,
                 "sites": {"n_derm": 0, "n_prostate": 6}, "variants": norm_variants},
}  # fmt: skip
MIN_STEPS = 200
# --smoke: every code path on tiny data (two sites per task, the fewest images and cases synth allows), nothing kept.
SMOKE = {"scale": 0.01, "minimums": Minimums(train=1, val=1, test=1, cases=3), "sites": 2}


# ---- data ---------------------------------------------------------------------------------------------------


def site_parameters(preset: str, task: str) -> list[dict[str, Any]]:
    """The preset's site table for a task, as plain data (what an attempt records as its parameter set)."""
    table = SITE_TABLES[preset][task]
    return [json.loads(json.dumps(dataclasses.asdict(site), default=list)) for site in table]


def parameters_digest(parameters: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:12]


def synthetic_data(root: Path, preset: str, task: str, scale: float, smoke: bool = False) -> tuple[Path, float]:
    """Site configs of `preset` for `task` at `scale`, generated once per parameter set (seconds spent)."""
    spec = TASKS[task]
    digest = parameters_digest(site_parameters(preset, task))
    folder = root / f"{preset}-{task}-{scale:g}-{digest}"
    configs = folder / "site_configs" / spec["task"].modality
    stamp = folder / "generated.json"
    if stamp.is_file():
        return configs, 0.0
    start = time.perf_counter()
    sites = {key: min(count, SMOKE["sites"]) for key, count in spec["sites"].items()} if smoke else spec["sites"]
    generate(folder, scale=scale, shift=preset, minimums=SMOKE["minimums"] if smoke else None, **sites)
    seconds = time.perf_counter() - start
    stamp.write_text(json.dumps({"preset": preset, "task": task, "scale": scale, "seconds": seconds}) + "\n")
    return configs, seconds


class Site:
    """One site's cached train (augmenting and plain) and validation datasets."""

    def __init__(self, config: Path, spec: dict[str, Any]):
        task: Task = spec["task"]
        settings = DataSettings(input_size=spec["input_size"], num_workers=1, **spec["data"])
        self.data = load_site(load_site_config(config), settings, task=task)
        self.name = self.data.name
        self.train_recipe = load_recipe(settings.recipe(task.key, "train"), input_size=spec["input_size"])
        eval_recipe = load_recipe(settings.recipe(task.key, "eval"), input_size=spec["input_size"])
        records = self.data.splits
        self.train = build_dataset(records["train"], self.train_recipe, num_workers=1)
        self.train_plain = build_dataset(records["train"], eval_recipe, num_workers=1)
        self.val = build_dataset(records["val"], eval_recipe, num_workers=1)
        self.num_train = len(records["train"])
        self.in_channels = task.input_channels(records["train"][0])


# ---- training and scoring -----------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, options: dict[str, Any]) -> torch.optim.Optimizer:
    if options["name"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=options["lr"], momentum=options["momentum"],
                               weight_decay=options["weight_decay"])
    return torch.optim.Adam(model.parameters(), lr=options["lr"], weight_decay=options["weight_decay"])


def train_loader(site: Site, batch: int, seed: int, round_: int, epoch: int):
    """medfl's training order: shuffled by a generator from (seed, site, round, epoch), a lone last sample
    dropped."""
    from monai.data import ThreadDataLoader

    generator = torch.Generator().manual_seed(derive_seed(seed, site.name, round_, epoch, "order"))
    drop_last = site.num_train > batch and site.num_train % batch == 1
    return ThreadDataLoader(site.train, buffer_size=2, batch_size=batch, shuffle=True, generator=generator,
                            drop_last=drop_last, num_workers=0)


def local_round(model: nn.Module, site: Site, spec: dict[str, Any], optimizer: dict[str, Any], seed: int,
                epochs: int, round_: int = 0) -> dict[str, float]:
    """One round of `epochs` local epochs with a fresh optimizer (medfl's train_epoch, supervised loss only)."""
    counts = torch.tensor(site.data.class_counts("train"), dtype=torch.float64)
    loss_fn = spec["task"].supervised_loss("ce", counts, CPASettings().beta)  # cross-entropy: beta unused
    opt = make_optimizer(model, optimizer)
    losses, steps = [], 0
    for epoch in range(epochs):
        site.train_recipe.set_random_state(seed=derive_seed(seed, site.name, round_, epoch))
        torch.manual_seed(derive_seed(seed, site.name, round_, epoch))
        loader = train_loader(site, spec["batch"], seed, round_, epoch)
        steps += len(loader)
        losses.append(train_epoch({"M": model}, {"M": opt}, loader, loss_fn, EpochPlan(), spec["task"],
                                  torch.device("cpu"))["M"])
    return {"steps": steps, "first_epoch_loss": losses[0], "last_epoch_loss": losses[-1]}


def _batches(dataset, batch: int):
    from monai.data import DataLoader

    return DataLoader(dataset, batch_size=max(batch, 32), shuffle=False, num_workers=0)


def macro_f1(model: nn.Module, site: Site, spec: dict[str, Any]) -> dict[str, Any]:
    """Macro-F1 on the site's validation split, and the raw predictions and labels for pooling."""
    outputs, labels = [], []
    with plain_tensors():
        for batch in _batches(site.val, spec["batch"]):
            logits, _ = model(torch.as_tensor(batch["image"]))
            outputs.append(logits.softmax(1))
            labels.append(torch.as_tensor(batch["label"]))
    probabilities, truth = torch.cat(outputs).numpy(), torch.cat(labels).reshape(-1).numpy()
    result = classification_metrics(truth, probabilities, CLASSES)
    return {"macro_f1": result["macro_f1"], "predictions": probabilities.argmax(1).tolist(), "labels": truth.tolist()}


def dice(model: nn.Module, site: Site, spec: dict[str, Any]) -> dict[str, Any]:
    """Mean foreground Dice over the validation cases, slices reassembled into volumes."""
    outputs, labels, cases, indices = [], [], [], []
    with plain_tensors():
        for batch in _batches(site.val, spec["batch"]):
            logits, _ = model(torch.as_tensor(batch["image"]))
            outputs.append(logits.argmax(1))
            labels.append(torch.as_tensor(batch["label"]))
            cases += list(batch["case_id"])
            indices += [int(i) for i in batch["slice_index"]]
    predicted = reassemble_volumes(cases, indices, list(torch.cat(outputs).numpy()))
    truth = reassemble_volumes(cases, indices, [m[0] for m in torch.cat(labels).numpy()])
    scores = [segmentation_case_metrics(predicted[c], truth[c])["dice"] for c in sorted(predicted)]
    return {"dice": float(np.mean(scores)), "cases": len(scores)}


SCORES = {"macro_f1": macro_f1, "dice": dice}  # by the validation metric each task names (Task.metric)


@torch.no_grad()
def score(model: nn.Module, site: Site, spec: dict[str, Any]) -> dict[str, Any]:
    """The task's validation metric on the site's validation split (and what pooling needs, if anything)."""
    model.eval()
    return SCORES[spec["task"].metric](model, site, spec)


def fedavg(models: dict[str, nn.Module], sizes: dict[str, int]) -> nn.Module:
    """The sample-weighted mean of every entry of the sites' state dicts (BatchNorm statistics included)."""
    names = list(models)
    weights = normalise_site_weights(names, sizes)
    states = {name: models[name].state_dict() for name in names}
    average = copy.deepcopy(models[names[0]])
    average.load_state_dict(average_states(states, weights, states[names[0]].keys()))
    return average


@torch.no_grad()
def reestimate_bn(model: nn.Module, site: Site, spec: dict[str, Any]) -> nn.Module | None:
    """A copy with BatchNorm running statistics recomputed over the site's training images; None without BN."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return None
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the pass
    model.train()
    with plain_tensors():
        for batch in _batches(site.train_plain, spec["batch"]):
            model(torch.as_tensor(batch["image"]))
    for module, momentum in zip(norms, momenta, strict=True):
        module.momentum = momentum
    return model


def probe(sites: list[Site], spec: dict[str, Any], optimizer: dict[str, Any], seed: int, epochs: int,
          model_options: dict[str, Any], warm_rounds: int = 0, warm_epochs: int = 5) -> dict[str, Any]:
    """One round from a common start; every site's local, local+bn, fedavg and fedavg+bn scores.

    The common start is the seeded initialisation, or (warm_rounds > 0) the FedAvg model after that many
    rounds of `warm_epochs` local epochs from it: the model every site holds at the start of round
    `warm_rounds` of a FedAvg federation.
    """
    torch.manual_seed(seed)
    task: Task = spec["task"]
    common = build_model(spec["model"], task.key, len(task.classes(spec["data"].get("classes"))),
                         sites[0].in_channels, width=spec["width"], **model_options)
    sizes = {site.name: site.num_train for site in sites}
    warm = []
    for round_ in range(warm_rounds):
        models = {site.name: copy.deepcopy(common) for site in sites}
        for site in sites:
            local_round(models[site.name], site, spec, optimizer, seed, warm_epochs, round_)
        common = fedavg(models, sizes)
        warm.append(float(np.mean([score(common, site, spec)[task.metric] for site in sites])))
    models, training = {}, {}
    for site in sites:
        models[site.name] = copy.deepcopy(common)
        start = time.perf_counter()
        training[site.name] = local_round(models[site.name], site, spec, optimizer, seed, epochs, warm_rounds)
        training[site.name]["seconds"] = round(time.perf_counter() - start, 1)
    average = fedavg(models, sizes)
    per_site = {}
    for site in sites:
        scores = {"local": score(models[site.name], site, spec), "fedavg": score(average, site, spec)}
        for name, model in (("local_bn", models[site.name]), ("fedavg_bn", average)):
            reestimated = reestimate_bn(model, site, spec)
            scores[name] = score(reestimated, site, spec) if reestimated is not None else None
        per_site[site.name] = {**scores, **training[site.name]}
    return {**summarise(per_site, spec), "warm_fedavg": [round(v, 4) for v in warm]}


def summarise(per_site: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Mean over sites of the metric for each model (and, classification, macro-F1 of the pooled predictions)."""
    metric = spec["task"].metric
    summary: dict[str, Any] = {"sites": {}}
    for model in ("local", "local_bn", "fedavg", "fedavg_bn"):
        values = {name: s[model][metric] for name, s in per_site.items() if s[model] is not None}
        if not values:
            continue
        summary[model] = float(np.mean(list(values.values())))
        if all("predictions" in per_site[name][model] for name in values):  # pooled macro-F1 where scores pool
            predictions = sum((per_site[name][model]["predictions"] for name in values), [])
            labels = sum((per_site[name][model]["labels"] for name in values), [])
            onehot = np.eye(len(CLASSES))[predictions]
            summary[f"{model}_pooled"] = classification_metrics(labels, onehot, CLASSES)["macro_f1"]
        for name, value in values.items():
            summary["sites"].setdefault(name, {})[model] = round(float(value), 4)
    for name, site in per_site.items():
        summary["sites"][name]["steps"] = site["steps"]
        summary["sites"][name]["loss"] = [round(site["first_epoch_loss"], 4), round(site["last_epoch_loss"], 4)]
    return summary


# ---- record -------------------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _commit() -> str:
    """The checked-out commit, with "+changes" when medfl/ or this script differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=BENCHMARKS, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "../medfl", "calibrate_shift.py"],
                                 capture_output=True, text=True, cwd=BENCHMARKS, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if changed else "")


def _start(attempt: dict[str, Any]) -> str:
    rounds = attempt.get("warm_rounds", 0)
    return "init" if not rounds else f"FedAvg after {rounds} x {attempt['warm_epochs']} ep"


def _column(runs: list[dict[str, Any]], key: str) -> list[Any]:
    return [run.get(key) for run in runs]


def write_markdown(attempts: list[dict[str, Any]], path: Path) -> None:
    lines = [
        "# Site-shift calibration: one FedAvg round from a common start",
        "",
        "Written by `benchmarks/calibrate_shift.py` from every attempt in `calibration.json` (all parameter sets "
        "tried, in order). Validation split of every site; mean over sites, mean ± sd over seeds. start: the "
        "model all sites hold before the probed round (init: the seeded common initialisation; FedAvg after "
        "W x E: the FedAvg model after W rounds of E local epochs from it). local: each site's own model after "
        "the round; local+bn: the same with BatchNorm statistics re-estimated on its own training images (the "
        "recipe's evaluation transforms); fedavg: the sample-weighted average of all sites' state dicts (BatchNorm "
        "statistics included); fedavg+bn: that average with BatchNorm statistics re-estimated on the site's own "
        "training images. drop = local - fedavg; back = (fedavg+bn - fedavg) / drop. Dermoscopy also gives "
        "macro-F1 of the pooled validation predictions.",
        "",
        "| # | preset | task | variant | start | params | scale | seeds | steps (min site) | local | local+bn | "
        "fedavg | fedavg+bn | drop | back | pooled local / fedavg / fedavg+bn | CPU min |",
        "|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for number, attempt in enumerate(attempts, start=1):
        runs = attempt["seeds"]
        local, avg, bn = _column(runs, "local"), _column(runs, "fedavg"), _column(runs, "fedavg_bn")
        drop = [a - b for a, b in zip(local, avg, strict=True)]
        has_bn = all(v is not None for v in bn)
        back = [(c - b) / (a - b) if a - b > 1e-9 else math.nan
                for a, b, c in zip(local, avg, bn, strict=True)] if has_bn else []
        pooled = (" / ".join(_mean_sd(_column(runs, f"{m}_pooled")) for m in ("local", "fedavg", "fedavg_bn"))
                  if runs[0].get("local_pooled") is not None else "–")
        steps = min(min(s["steps"] for s in r["sites"].values()) for r in runs)
        lines.append(
            f"| {number} | {attempt['preset']} | {attempt['task']} | {attempt['variant']} | {_start(attempt)} | "
            f"`{attempt['parameters_digest']}` | {attempt['scale']:g} | {len(runs)} | {steps} | {_mean_sd(local)} | "
            f"{_mean_sd(_column(runs, 'local_bn'))} | {_mean_sd(avg)} | {_mean_sd(bn) if has_bn else '–'} | "
            f"{_mean_sd(drop)} | {_mean_sd(back) if has_bn else '–'} | {pooled} | {attempt['cpu_minutes']:.1f} |"
        )
    lines += ["", "## Per site (mean over seeds)", ""]
    for number, attempt in enumerate(attempts, start=1):
        runs = attempt["seeds"]
        note = f" {attempt['note']}" if attempt.get("note") else ""
        curves = list(zip(*[run.get("warm_fedavg") or [] for run in runs], strict=True))
        warm = f" FedAvg after each warm-up round: {', '.join(_mean_sd(list(v)) for v in curves)}." if curves else ""
        lines += [f"**#{number}** {attempt['preset']} {attempt['task']} {attempt['variant']}, start "
                  f"{_start(attempt)} ({attempt['label'] or 'no label'}; {attempt['date']}, commit "
                  f"{attempt['commit']}).{note}{warm}", "",
                  "| site | train samples | steps | local | local+bn | fedavg | fedavg+bn | loss first -> last epoch |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name in runs[0]["sites"]:
            cells = [r["sites"][name] for r in runs]
            loss = [c["loss"] for c in cells]
            values = [[c.get(k) for c in cells] for k in ("local", "local_bn", "fedavg", "fedavg_bn")]
            lines.append(
                f"| {name} | {attempt['train_samples'][name]} | {cells[0]['steps']} | "
                + " | ".join(_mean_sd(v) if None not in v else "–" for v in values)
                + f" | {statistics.mean(x[0] for x in loss):.3f} -> {statistics.mean(x[1] for x in loss):.3f} |"
            )
        lines.append("")
    lines += ["## Parameter sets", ""]
    seen: dict[str, dict[str, Any]] = {}
    for attempt in attempts:
        seen.setdefault(attempt["parameters_digest"], attempt)
    for digest, attempt in seen.items():
        lines += [f"`{digest}`: {attempt['preset']} {attempt['task']} sites (full values in calibration.json)", ""]
        for site in attempt["parameters"]:
            lines.append(f"- {_describe(site)}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _describe(site: dict[str, Any]) -> str:
    if "acquisition" in site:
        a = site["acquisition"]
        return (f"{site['name']}: {a['resolution']} px, gains {tuple(a['cast'])}, contrast {a['contrast']}, "
                f"offset {tuple(a['offset'])}, cast jitter {a['cast_jitter']}, magnification {a['magnification']}, "
                f"blur {a['blur']}, noise {a['noise']}, JPEG {a['jpeg_quality']}, ring {a['ring']}, vignette "
                f"{a['vignette']}, skin tone {tuple(site['skin_tone'])}, train counts {tuple(site['train_counts'])}")
    s, p = site["scanner"], site["population"]
    return (f"{site['name']}: FOV {s['matrix'] * s['spacing']:.0f} mm, {s['matrix']} px of {s['spacing']} mm, "
            f"{s['slices']} x {s['thickness']} mm, noise {s['noise']:.3f}, bias {s['bias']}, contrast "
            f"{s['contrast']} (PZ {s['peripheral']}, CG {s['central']}, fat {s['fat']}), endorectal "
            f"{s['endorectal']}, surface {s['surface']}, gland x{p['gland_scale']} (sd {p['gland_spread']}, "
            f"central +{p['central_extra']})")


# ---- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=tuple(TASKS), default="dermoscopy")
    parser.add_argument("--presets", default="mild,realistic", help=f"comma-separated, of {', '.join(SHIFTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=5, help="local epochs of the one round")
    parser.add_argument("--optimizers", default="sgd,adam", help="dermoscopy: sgd, adam")
    parser.add_argument("--norms", default="instance,batch", help="prostate UNet: instance, batch")
    parser.add_argument("--warm-rounds", type=int, default=0,
                        help="FedAvg rounds before the probed one (0: probe from the common initialisation)")
    parser.add_argument("--warm-epochs", type=int, default=5, help="local epochs of each warm-up round")
    parser.add_argument("--scale", type=float, help="data scale (default: 0.6 dermoscopy, 3.3 prostate)")
    parser.add_argument("--data", type=Path, default=DATA, help="where generated data are kept between runs")
    parser.add_argument("--label", default="", help="a note recorded with the attempts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true",
                        help="every task and variant on tiny data (the mild preset, 2 sites, one seed, 1 epoch after a "
                             "1-epoch warm-up round); data and record go to a temporary folder that is removed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not args.smoke:
        return calibrate(args, args.task)
    with tempfile.TemporaryDirectory() as tmp:
        smoke = argparse.Namespace(**{**vars(args), "seeds": "0", "epochs": 1, "warm_rounds": 1, "warm_epochs": 1,
                                      "scale": SMOKE["scale"], "data": Path(tmp) / "data", "out": Path(tmp) / "results",
                                      "label": "smoke", "presets": "mild"})
        # The presets share the code path; mild's sites are the cheapest to write (a realistic prostate volume takes
        # about a CPU second, most of this smoke's data).
        for task in TASKS:
            calibrate(smoke, task)
    return 0


def calibrate(args: argparse.Namespace, task: str) -> int:
    """Probe every preset and variant of one task; append the attempts to <out>/calibration.json, rewrite the md."""
    spec = TASKS[task]
    scale = args.scale or spec["scale"]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = spec["variants"](args)
    record_path = args.out / "calibration.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"attempts": []}
    for preset in args.presets.split(","):
        configs, synth_seconds = synthetic_data(args.data, preset, task, scale, smoke=args.smoke)
        sites = [Site(config, spec) for config in sorted(configs.glob("*.yaml"))]
        for variant, (optimizer, options) in variants.items():
            start = time.process_time()
            runs = []
            for seed in seeds:
                result = probe(sites, spec, optimizer, seed, args.epochs, options, args.warm_rounds,
                               args.warm_epochs)
                runs.append({"seed": seed, **result})
                print(f"{preset} {task} {variant} seed {seed} warm {result['warm_fedavg']}: local "
                      f"{result['local']:.3f} local+bn {result.get('local_bn', float('nan')):.3f} fedavg "
                      f"{result['fedavg']:.3f} +bn {result.get('fedavg_bn', float('nan')):.3f} "
                      f"(steps min {min(s['steps'] for s in result['sites'].values())})", flush=True)
            if min(s["steps"] for r in runs for s in r["sites"].values()) < MIN_STEPS:
                print(f"warning: a site made fewer than {MIN_STEPS} local steps", file=sys.stderr)
            parameters = site_parameters(preset, task)
            record["attempts"].append({
                "label": args.label, "date": time.strftime("%Y-%m-%d %H:%M"), "commit": _commit(),
                "preset": preset, "task": task, "variant": variant, "scale": scale, "epochs": args.epochs,
                "warm_rounds": args.warm_rounds, "warm_epochs": args.warm_epochs,
                "optimizer": optimizer, "model": {"name": spec["model"], "width": spec["width"], **options},
                "input_size": spec["input_size"], "batch": spec["batch"],
                "parameters_digest": parameters_digest(parameters), "parameters": parameters,
                "train_samples": {site.name: site.num_train for site in sites},
                "synth_seconds": round(synth_seconds, 1), "cpu_minutes": (time.process_time() - start) / 60,
                "seeds": [{k: v for k, v in run.items()} for run in runs],
            })  # fmt: skip
            args.out.mkdir(parents=True, exist_ok=True)
            record_path.write_text(json.dumps(record, indent=1) + "\n")
            write_markdown(record["attempts"], args.out / "calibration.md")
    print(f"wrote {record_path} and {args.out / 'calibration.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
