"""The contest a hospital would run: every compared method's settings chosen on validation, the same way for all.

Stage `select` (this file's GRID, committed before its runs): on the development federation (the realistic
dermoscopy sites, `medfl synth --shift realistic`, data seed 0, site-seed 0: the quality benchmark's default
plan), every compared method gets the same number of trials, four, one seed (0). A method's pick is the trial
with the highest mean over sites of the fine-tuned protocol's validation score (each site's model after local
training, at the round its own validation split selected: `summary.json` sites.<site>.val_<metric>); ties go
to the earlier trial in the list. Test scores are never read by this stage's choice.

Stage `confirm` runs every compared method at its pick on a federation nobody chose anything on (CONFIRMATION:
other hospitals from `--site-seed`, other patients from the data seed), 3 seeds, both tasks; it refuses to
start until the picks are committed in benchmarks/results/contest.choice.json.

    python benchmarks/contest.py --stage select      # 28 runs, about 2.6 CPU-hours on the 2-core plan
    python benchmarks/contest.py --stage select --choose   # write contest.choice.json from the finished grid
    python benchmarks/contest.py --stage confirm            # every confirmation run, then the tables
    python benchmarks/contest.py --stage confirm --report   # the tables from the finished runs only
    python benchmarks/contest.py --stage confirm --only dermoscopy-prr-seed0   # rerun one, compare exactly

Runs go to benchmarks/results/tmp/contest/<stage>/ (interrupted ones are resumed). A finished run's config,
summary and record (the commit it ran on, when it started, its wall and CPU time), and for the confirmation what
each site's model did on every test case (cases.json: the bootstrap's input), are kept in
benchmarks/results/contest/<stage>/<run>/ and committed: a later session reuses a kept run whose config is the
one planned instead of running it again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from quality import (  # noqa: E402 - the sibling benchmark script, found through the line above
    REALISTIC_DERMOSCOPY,
    REALISTIC_PROSTATE,
    RESULTS,
    Preset,
    TaskPlan,
    cell,
    deep_merge,
    experiment_dict,
    nanmean,
    run_all,
    run_job,
    spread,
    train_counts,
    worker_pool,
)

from medfl.checkpoints import atomic_write_json, atomic_write_text  # noqa: E402
from medfl.methods import method_spec  # noqa: E402

COMPARED = ("local", "fedavg", "fedbn", "ditto", "pooled", "prr", "fedavg_det")
ALSO_CONFIRMED = ("fedprox", "fml")  # at their defaults, one seed: the earlier baselines, for continuity
# the methods every other is paired against, by seed: the method, and DET fed by plain averaging (whether PFA or
# FedAvg should feed DET is one of the contest's questions)
PAIRED_AGAINST = ("prr", "fedavg_det")
LEARNING_RATES = (5e-3, 1e-2, 2e-2, 4e-2)  # SGD, the realistic dermoscopy plan's optimizer (1e-2: the reference)


@dataclass(frozen=True)
class Trial:
    """One setting of one method: a label and the experiment options it changes."""

    label: str
    options: dict[str, Any] = field(default_factory=dict)


def _lr(rate: float) -> Trial:
    return Trial(f"lr{rate:g}", {"optimizer": {"lr": rate}})


# The committed grid: four trials per method. Methods without options of their own get the learning rate;
# ditto gets lambda (the paper tunes it per data set); prr gets its three open options one at a time; fedavg_det
# has two of them (no PFA) and gets the learning rate above the reference's as its fourth.
GRID: dict[str, tuple[Trial, ...]] = {
    "local": tuple(_lr(rate) for rate in LEARNING_RATES),
    "fedavg": tuple(_lr(rate) for rate in LEARNING_RATES),
    "fedbn": tuple(_lr(rate) for rate in LEARNING_RATES),
    "pooled": tuple(_lr(rate) for rate in LEARNING_RATES),
    "ditto": tuple(Trial(f"lambda{value:g}", {"baselines": {"ditto_lambda": value}}) for value in (0.1, 0.3, 1.0, 3.0)),
    "prr": (Trial("default"),
            Trial("bn_on_receive", {"det": {"reestimate_bn_on_receive": True}}),
            Trial("amplitude_only", {"pfa": {"share_phase": False}}),
            Trial("phi_train", {"det": {"phi_source": "train"}})),
    "fedavg_det": (Trial("default"),
                   Trial("bn_on_receive", {"det": {"reestimate_bn_on_receive": True}}),
                   Trial("phi_train", {"det": {"phi_source": "train"}}),
                   _lr(2e-2)),
}
SELECTION_SEED = 0

# The development federation: the quality benchmark's default plan (dermoscopy only for the choice).
DEVELOPMENT = Preset("the realistic federation, dermoscopy, the quality benchmark's 2-core plan", scale=0.6,
                     device="cpu", shift="realistic", tasks={"dermoscopy": REALISTIC_DERMOSCOPY})
# The confirmation federation (pre-registered with the grid): other hospitals and other patients. Prostate runs
# 6 rounds so that P can learn from D (4 in the development plan).
CONFIRMATION_SITE_SEED = 1
CONFIRMATION_DATA_SEED = 1
CONFIRMATION_SEEDS = 3
CONFIRMATION = Preset(
    "the confirmation federation: `medfl synth --shift realistic --site-seed 1 --seed 1`, both tasks",
    scale=0.6, device="cpu", shift="realistic",
    tasks={"dermoscopy": REALISTIC_DERMOSCOPY,
           "prostate": TaskPlan(**{**REALISTIC_PROSTATE.__dict__, "rounds": 6, "ablations": ()})})

CHOICE = RESULTS / "contest.choice.json"


def git(*args: str, cwd: Path = BENCHMARKS) -> str:
    """A git command's output, run in the checkout the benchmark runs from."""
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def commit_of(folder: Path) -> str:
    """The commit the benchmark's code is at (the worktree it runs from), '+dirty' when it has changes."""
    head = git("rev-parse", "HEAD", cwd=folder)
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", cwd=folder) else "")


def selection_jobs(root: Path, threads: int, grid: dict[str, tuple[Trial, ...]], plan: TaskPlan,
                   seed: int = SELECTION_SEED) -> list[dict[str, Any]]:
    """Every (method, trial) run of the grid on the development federation, one seed."""
    synth = root / "synth"
    jobs = []
    for method, trials in grid.items():
        for trial in trials:
            name = f"dermoscopy-{method}-{trial.label}-seed{seed}"
            config = deep_merge(experiment_dict("dermoscopy", plan, method, seed, synth, threads, "cpu"), trial.options)
            path = root / "configs" / f"{name}.yaml"
            atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
            jobs.append({"name": name, "task": "dermoscopy", "method": method, "label": trial.label, "seed": seed,
                         "threads": threads, "config": str(path), "run_dir": str(root / "runs" / name)})
    return jobs


def recorded_job(job: dict[str, Any]) -> dict[str, Any]:
    """run_job, with the commit the run's code is at and when it started kept beside its timing; a finished run's
    config, summary and record are kept under `job["kept"]` (committed: a later session reuses them)."""
    record = Path(job["run_dir"]).parent.parent / "records" / f"{job['name']}.json"  # not in the run folder
    if not record.is_file():
        atomic_write_json(record, {"commit": job["commit"], "started": datetime.now(timezone.utc).isoformat()})
    result = {**run_job(job), **json.loads(record.read_text())}
    kept, run_dir = Path(job["kept"]), Path(job["run_dir"])
    atomic_write_text(kept / "config.yaml", (run_dir / "config.yaml").read_text(encoding="utf-8"))
    atomic_write_text(kept / "summary.json", (run_dir / "summary.json").read_text(encoding="utf-8"))
    if job.get("cases"):  # the confirmation's bootstrap reads what each site's model did on every test case
        atomic_write_json(kept / "cases.json", case_outcomes(run_dir))
    atomic_write_json(kept / "job.json", {k: result.get(k) for k in ("commit", "started", "wall_s", "cpu_s")})
    return result


def kept_result(job: dict[str, Any]) -> dict[str, Any] | None:
    """A finished run of an earlier session, kept with the same experiment config: reused, not rerun."""
    from medfl.experiment import load_experiment_config

    kept = Path(job["kept"])
    if not (kept / "summary.json").is_file() or not json.loads((kept / "summary.json").read_text())["finished"]:
        return None
    planned = load_experiment_config(job["config"]).resolved()
    if _portable(yaml.safe_load((kept / "config.yaml").read_text(encoding="utf-8"))) != _portable(planned):
        return None
    return {**job, **json.loads((kept / "job.json").read_text()), "reused": True}


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without where this checkout keeps its data and runs: the sites by file name (the synthetic
    data is regenerated byte for byte from its seeds: tests/test_synth_shift.py guards it), no output folder,
    and no `runtime.parallel_sites` (added later; results are the same bit for bit whatever its value)."""
    runtime = {k: v for k, v in config.get("runtime", {}).items() if k != "parallel_sites"}
    return {**{k: v for k, v in config.items() if k != "output_dir"},
            "sites": [Path(site).name for site in config["sites"]], "runtime": runtime}


def site_scores(kept: Path) -> dict[str, float]:
    """Each site's fine-tuned-protocol validation score at its selected round."""
    summary = json.loads((kept / "summary.json").read_text())
    metric = summary["metric"]
    return {site: values[f"val_{metric}"] for site, values in summary["sites"].items()}


def choose(jobs: list[dict[str, Any]], grid: dict[str, tuple[Trial, ...]]) -> dict[str, Any]:
    """Each method's pick: the trial with the highest mean validation score over sites (first on ties)."""
    picks = {}
    for method, trials in grid.items():
        scored = []
        for trial in trials:
            job = next(j for j in jobs if j["method"] == method and j["label"] == trial.label)
            scores = site_scores(Path(job["kept"]))
            scored.append({"trial": trial.label, "options": trial.options, "val_mean": statistics.fmean(scores.values()),
                           "val_by_site": scores})
        best = max(range(len(scored)), key=lambda i: (scored[i]["val_mean"], -i))
        picks[method] = {"pick": scored[best]["trial"], "options": scored[best]["options"], "trials": scored}
    return picks


def selection_markdown(picks: dict[str, Any]) -> str:
    lines = ["| method | trial | mean validation macro-F1 (fine-tuned protocol) | picked |", "|:---|:---|---:|:---:|"]
    for method, entry in picks.items():
        for trial in entry["trials"]:
            mark = "**yes**" if trial["trial"] == entry["pick"] else ""
            lines.append(f"| {method} | {trial['trial']} | {trial['val_mean']:.3f} | {mark} |")
    return "\n".join(lines)


# ---- the confirmation stage ------------------------------------------------------------------------------

CONFIRM_SUMMARY_KEYS = ("val", "test", "reference", "retrogress", "recovery", "curve_dips")
BOOTSTRAP_REPLICATES = 2000


def descends(commit: str, ancestor: str) -> bool:
    """Whether `commit` (a run's record, '+dirty' stripped) has `ancestor` in its history."""
    return subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, commit.removesuffix("+dirty")],
                          cwd=BENCHMARKS, capture_output=True).returncode == 0


def committed_choice(path: Path = CHOICE) -> tuple[dict[str, Any], str]:
    """The picks and the pre-registration commit (the last one that changed contest.choice.json); refuses unless the
    file is committed unchanged and this checkout descends from that commit."""
    relative = path.relative_to(BENCHMARKS.parent).as_posix()
    if not path.is_file():
        raise SystemExit(f"{relative} does not exist: run `contest.py --stage select --choose` and commit it first")
    commit = git("log", "-1", "--format=%H", "--", str(path))  # a path git reads relative to benchmarks/ otherwise
    if not commit or git("status", "--porcelain", "--", str(path)):
        raise SystemExit(f"{relative} is not committed as it is: commit the picks before any confirmation run")
    if not descends(git("rev-parse", "HEAD"), commit):
        raise SystemExit(f"this checkout does not descend from the pre-registration commit {commit[:12]}")
    return json.loads(path.read_text(encoding="utf-8")), commit


def task_options(task: str, options: dict[str, Any]) -> dict[str, Any]:
    """A pick's options for `task`: dermoscopy takes them all; prostate takes the method's own options (ditto's
    lambda, DET's and PFA's switches) but keeps its plan's stated optimizer (learning rates were picked for SGD on
    dermoscopy)."""
    return options if task == "dermoscopy" else {k: v for k, v in options.items() if k != "optimizer"}


def confirmation_jobs(root: Path, threads: int, picks: dict[str, Any], preset: Preset, seeds: int,
                      also: tuple[str, ...] = ALSO_CONFIRMED) -> list[dict[str, Any]]:
    """Every confirmation run, in the order they start: the compared methods' dermoscopy seeds first (they are never
    cut), then prostate seed by seed; the methods confirmed at their defaults (one seed) after each task's first
    seed; two-model methods first within a seed (they take longest)."""
    synth = root / "synth"
    order = sorted(picks, key=lambda m: not method_spec(m).two_models)
    planned: list[tuple[str, str, int]] = []
    for task in preset.tasks:
        for seed in range(seeds):
            planned += [(task, method, seed) for method in order]
            if seed == 0 or seeds == 1:
                planned += [(task, method, 0) for method in also]
    if "prostate" in preset.tasks and "dermoscopy" in preset.tasks:  # dermoscopy's seeds before prostate's
        planned.sort(key=lambda item: (item[0] != "dermoscopy"))
    jobs = []
    for task, method, seed in planned:
        name = f"{task}-{method}-seed{seed}"
        options = task_options(task, picks[method]["options"]) if method in picks else {}
        config = deep_merge(experiment_dict(task, preset.tasks[task], method, seed, synth, threads, "cpu"), options)
        path = root / "configs" / f"{name}.yaml"
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
        jobs.append({"name": name, "task": task, "method": method, "seed": seed, "threads": threads,
                     "trial": picks[method]["trial"] if method in picks else "default", "config": str(path),
                     "run_dir": str(root / "runs" / name), "cases": True})
    return jobs


def case_outcomes(run_dir: Path) -> dict[str, Any]:
    """Per site, what the model it uses at its selected round (fine-tuned protocol) did on each test case:
    classification the true and predicted class of every image, segmentation the Dice of every case. Recomputed
    from the run folder (medfl keeps models, not predictions) and checked against the run's own summary."""
    import numpy as np
    import torch
    from monai.data import DataLoader

    from medfl.data.tensors import plain, plain_tensors
    from medfl.metrics import reassemble_volumes, segmentation_case_metrics
    from medfl.report.predictions import SplitCache, load_selected_model
    from medfl.report.runs import load_run
    from medfl.tasks import task_for

    run = load_run(run_dir)
    splits, device, outcomes = SplitCache(task_for(run.task)), torch.device("cpu"), {}
    for site in run.sites:
        model = load_selected_model(run, site, device)
        labels, predicted, cases, indices = [], [], [], []
        with torch.no_grad(), plain_tensors():
            for batch in DataLoader(splits.dataset(run, site), batch_size=32):
                logits, _ = model(plain(batch["image"]).to(device))
                label = torch.as_tensor(batch["label"])
                if run.task == "classification":
                    predicted += logits.argmax(dim=1).tolist()
                    labels += label.reshape(-1).tolist()
                else:
                    predicted += list(logits.max(dim=1).indices.to(torch.uint8).numpy())
                    labels += list((label[:, 0] if label.ndim == logits.ndim else label).gt(0).to(torch.uint8).numpy())
                    cases += [str(c) for c in batch["case_id"]]
                    indices += [int(i) for i in torch.as_tensor(batch["slice_index"]).reshape(-1)]
        expected = run.summary["sites"][site]["test"][run.metric]
        if run.task == "classification":
            outcomes[site] = {"labels": labels, "predicted": predicted}
            classes = len(run.config["data"]["classes"])
            value = float(macro_f1(np.asarray(labels), np.asarray(predicted)[None], classes)[0])
        else:
            volumes, truths = reassemble_volumes(cases, indices, predicted), reassemble_volumes(cases, indices, labels)
            dice = {case: segmentation_case_metrics(volumes[case], truths[case], distances=False)["dice"]
                    for case in sorted(volumes)}
            outcomes[site] = {"dice": dice}
            value = float(np.mean(list(dice.values())))
        if abs(value - expected) > 1e-6:
            raise RuntimeError(f"{run_dir}: {site}'s recomputed test {run.metric} {value} differs from the run's "
                               f"{expected}: the bootstrap would not describe the reported score")
    return outcomes


def macro_f1(labels: Any, predicted: Any, classes: int) -> Any:
    """Macro-F1 of every row of `predicted` (R, N) against `labels` ((N,) or (R, N)), over all `classes` (a class
    with neither truth nor prediction scores 0, as medfl.metrics does); shape (R,)."""
    import numpy as np

    labels = np.broadcast_to(labels, predicted.shape)
    scores = []
    for c in range(classes):
        truth, guess = labels == c, predicted == c
        tp = (truth & guess).sum(axis=1)
        denominator = truth.sum(axis=1) + guess.sum(axis=1)
        scores.append(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0))
    return np.mean(scores, axis=0)


def bootstrap_site(outcomes: dict[str, dict[str, Any]], classes: int | None, replicates: int, seed: int = 0
                   ) -> dict[str, Any]:
    """One site's test score per method (mean over the seeds' models) with its 95% interval, and each method's
    difference to prr, by resampling the site's test cases (the same resample for every method and seed).

    `outcomes`: method -> seed -> that run's case outcomes at this site."""
    import numpy as np

    rng = np.random.default_rng(seed)
    first = next(iter(next(iter(outcomes.values())).values()))
    size = len(first["labels"]) if classes else len(first["dice"])
    draws = rng.integers(0, size, size=(replicates, size))

    def scores(outcome: dict[str, Any]) -> Any:  # (replicates,) and the point estimate
        if classes:
            labels, predicted = np.asarray(outcome["labels"]), np.asarray(outcome["predicted"])
            return macro_f1(labels[draws], predicted[draws], classes), macro_f1(labels, predicted[None], classes)[0]
        dice = np.asarray([outcome["dice"][case] for case in sorted(outcome["dice"])])
        return dice[draws].mean(axis=1), dice.mean()

    per_method = {}
    for method, seeds in outcomes.items():
        pairs = [scores(outcome) for outcome in seeds.values()]
        per_method[method] = (np.mean([p[0] for p in pairs], axis=0), float(np.mean([p[1] for p in pairs])))
    result = {}
    for method, (replicated, point) in per_method.items():
        entry = {"score": point, "ci95": [float(v) for v in np.percentile(replicated, [2.5, 97.5])],
                 "seeds": sorted(outcomes[method])}
        if "prr" in per_method and method != "prr":
            difference = per_method["prr"][0] - replicated
            entry["prr_minus"] = {"score": per_method["prr"][1] - point,
                                  "ci95": [float(v) for v in np.percentile(difference, [2.5, 97.5])]}
        result[method] = entry
    return result


def kept_values(summary: dict[str, Any], rarest: str | None) -> dict[str, dict[str, float]]:
    """Per site, the values the tables report, from a run's summary.json."""
    metric, values = summary["metric"], {}
    reference = summary.get("reference_protocol", {}).get("sites", {})
    for site, entry in summary["sites"].items():
        row = {"val": entry[f"val_{metric}"], "test": entry["test"][metric],
               "reference": reference.get(site, {}).get("test", {}).get(metric),
               **{k: entry.get(k) for k in ("retrogress", "recovery", "curve_dips")}}
        if rarest:
            row["test_rarest"] = entry["test"].get(f"f1_{rarest}")
            row["reference_rarest"] = reference.get(site, {}).get("test", {}).get(f"f1_{rarest}")
        if metric == "dice":
            row["hd95"] = entry["test"].get("hd95")
        values[site] = {k: (math.nan if v is None else float(v)) for k, v in row.items()}
    return values


def summarise_confirmation(jobs: list[dict[str, Any]], rarest: dict[str, str | None], replicates: int
                           ) -> dict[str, Any]:
    """From the kept runs (config, summary and case outcomes, committed): per task and method the mean over sites
    across seeds, paired differences by seed to prr and to fedavg_det (PAIRED_AGAINST), per-site bootstrap intervals."""
    results: dict[str, Any] = {}
    for task in dict.fromkeys(job["task"] for job in jobs):
        finished = [job for job in jobs if job["task"] == task and (Path(job["kept"]) / "cases.json").is_file()]
        runs: dict[str, dict[int, dict[str, Any]]] = {}
        for job in finished:
            kept = Path(job["kept"])
            runs.setdefault(job["method"], {})[job["seed"]] = {
                "values": kept_values(json.loads((kept / "summary.json").read_text()), rarest.get(task)),
                "cases": json.loads((kept / "cases.json").read_text())}
        if not runs:
            continue
        sites = sorted(next(iter(next(iter(runs.values())).values()))["values"])
        names = list(next(iter(next(iter(runs.values())).values()))["values"][sites[0]])
        methods = {}
        for method, seeds in runs.items():
            site_means = {seed: {n: nanmean([run["values"][s][n] for s in sites]) for n in names}
                          for seed, run in seeds.items()}
            methods[method] = {"seeds": sorted(seeds), "trial": next(j["trial"] for j in jobs if j["method"] == method),
                               "mean": {n: spread([site_means[s][n] for s in seeds]) for n in names},
                               "per_seed": {str(s): site_means[s] for s in seeds},
                               "sites": {site: {n: spread([seeds[s]["values"][site][n] for s in seeds])
                                                for n in names} for site in sites}}
        paired: dict[str, dict[str, Any]] = {}
        for base in (b for b in PAIRED_AGAINST if b in methods):
            for method in methods:
                common = sorted(set(methods[base]["seeds"]) & set(methods[method]["seeds"]))
                if method != base and common:
                    paired.setdefault(base, {})[method] = {
                        n: spread([methods[base]["per_seed"][str(s)][n] - methods[method]["per_seed"][str(s)][n]
                                   for s in common]) for n in names if n not in ("val",)}
        config = yaml.safe_load((Path(finished[0]["kept"]) / "config.yaml").read_text(encoding="utf-8"))
        classes = len(config["data"]["classes"]) if task == "dermoscopy" else None
        bootstrap = {site: bootstrap_site({m: {s: run["cases"][site] for s, run in seeds.items()}
                                           for m, seeds in runs.items()}, classes, replicates)
                     for site in sites}
        results[task] = {"sites": sites, "rarest_class": rarest.get(task), "methods": methods,
                         "paired_minus": paired, "bootstrap": bootstrap}
    return results


def lineage(jobs: list[dict[str, Any]], choice_commit: str) -> dict[str, Any]:
    """Whether every finished confirmation run's commit descends from the pre-registration commit."""
    records = {job["name"]: json.loads((Path(job["kept"]) / "job.json").read_text())["commit"]
               for job in jobs if (Path(job["kept"]) / "job.json").is_file()}
    bad = sorted(name for name, commit in records.items() if commit.endswith("+dirty") or not descends(commit, choice_commit))
    return {"choice_commit": choice_commit, "runs": len(records), "all_descend": not bad, "violations": bad}


def confirmation_markdown(results: dict[str, Any], planned: dict[str, int], finished: dict[str, int],
                          replicates: int = BOOTSTRAP_REPLICATES) -> str:
    lines = []
    for task, result in results.items():
        metric = "macro-F1" if task == "dermoscopy" else "Dice"
        rare = result["rarest_class"]
        methods = [m for m in COMPARED + ALSO_CONFIRMED if m in result["methods"]]
        columns = [("test", f"{metric} (fine-tuned)"), ("reference", f"{metric} (reference protocol)")]
        if rare:
            columns += [("test_rarest", f"F1 {rare}, rarest (fine-tuned)"),
                        ("reference_rarest", f"F1 {rare} (reference)")]
        if task == "prostate":
            columns.append(("hd95", "HD95 mm (fine-tuned)"))
        columns += [("retrogress", "retrogress (receiving model)"), ("curve_dips", "curve dips (used model)")]
        lines += [f"### {task}: {finished[task]} of {planned[task]} runs finished", "",
                  "Mean over sites; mean ± sd across seeds. Fine-tuned: each site's model after local training at the "
                  "round its own validation split chose (fedavg and fedbn are then FedAvg-FT and FedBN-FT); reference: "
                  "the model right after communication, one round for all sites.", "",
                  "| method | pick | seeds | " + " | ".join(c[1] for c in columns) + " |",
                  "|:---|:---|---:|" + "---:|" * len(columns)]
        for m in methods:
            entry = result["methods"][m]
            lines.append(f"| {m} | {entry['trial']} | {len(entry['seeds'])} | "
                         + " | ".join(cell(entry["mean"][c], 2 if c == "hd95" else 3) for c, _ in columns) + " |")
        paired_columns = columns[:4 if rare else 2]  # the scores, not retrogress or dips
        for base, against in result["paired_minus"].items():
            lines += ["", f"**{base} minus each method, paired by seed** (mean ± sd of the differences of the "
                      "mean over sites):", "",
                      f"| {base} minus | seeds | " + " | ".join(c[1] for c in paired_columns) + " |",
                      "|:---|---:|" + "---:|" * len(paired_columns)]
            for m, diffs in against.items():
                lines.append(f"| {m} | {next(iter(diffs.values()))['n']} | "
                             + " | ".join(cell(diffs[c]) for c, _ in paired_columns) + " |")
        lines += ["", f"**Per site, fine-tuned {metric} with its 95% interval** (bootstrap over the site's test cases, "
                  f"{replicates} resamples, the seeds' models averaged on each resample); then prr minus "
                  "each method on the same resamples:", "",
                  "| method | " + " | ".join(result["sites"]) + " |", "|:---|" + "---:|" * len(result["sites"])]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(
                f"{result['bootstrap'][s][m]['score']:.3f} [{result['bootstrap'][s][m]['ci95'][0]:.3f}, "
                f"{result['bootstrap'][s][m]['ci95'][1]:.3f}]" for s in result["sites"]) + " |")
        for m in methods:
            if "prr_minus" in result["bootstrap"][result["sites"][0]][m]:
                lines.append(f"| prr - {m} | " + " | ".join(
                    f"{result['bootstrap'][s][m]['prr_minus']['score']:+.3f} "
                    f"[{result['bootstrap'][s][m]['prr_minus']['ci95'][0]:+.3f}, "
                    f"{result['bootstrap'][s][m]['prr_minus']['ci95'][1]:+.3f}]" for s in result["sites"]) + " |")
        lines.append("")
    return "\n".join(lines)


def confirmation_figure(results: dict[str, Any], path: Path) -> None:
    """Mean over sites of the fine-tuned test score per method, the seeds' spread as error bars, one panel per task."""
    from matplotlib.figure import Figure

    from medfl.report.plots import save_png

    figure = Figure(figsize=(5.5 * max(1, len(results)), 3.8), layout="constrained")
    for axis, (task, result) in zip(figure.subplots(1, max(1, len(results)), squeeze=False)[0], results.items(), strict=True):
        methods = [m for m in COMPARED + ALSO_CONFIRMED if m in result["methods"]]
        means = [result["methods"][m]["mean"]["test"]["mean"] for m in methods]
        errors = [result["methods"][m]["mean"]["test"]["sd"] or 0.0 for m in methods]
        axis.bar(range(len(methods)), means, yerr=errors, capsize=3,
                 color=["C3" if m == "prr" else "C0" if m in COMPARED else "0.6" for m in methods])
        axis.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
        axis.set_title(f"{task}: test {'macro-F1' if task == 'dermoscopy' else 'Dice'} (fine-tuned), confirmation",
                       fontsize=10)
    save_png(figure, path)


def rarest_classes(synth: Path, preset: Preset) -> dict[str, str | None]:
    """The dermoscopy class with the fewest training images over the federation (read with medfl's reader)."""
    if "dermoscopy" not in preset.tasks:
        return {}
    config = experiment_dict("dermoscopy", preset.tasks["dermoscopy"], "local", 0, synth, 1, "cpu")
    counts = train_counts(config)
    totals = [sum(column) for column in zip(*counts.values(), strict=True)]
    return {"dermoscopy": config["data"]["classes"][totals.index(min(totals))], "prostate": None}


def reproduce_kept(job: dict[str, Any], scratch: Path) -> int:
    """Rerun one kept confirmation run from scratch and compare its summary and case outcomes with the kept ones,
    exactly; 0 when identical."""
    kept = Path(job["kept"])
    if not (kept / "cases.json").is_file():
        print(f"{job['name']} has not finished: nothing to reproduce")
        return 2
    fresh = {**job, "run_dir": str(scratch / job["name"]), "kept": str(scratch / "kept" / job["name"])}
    shutil.rmtree(fresh["run_dir"], ignore_errors=True)
    run_all([fresh], 1, runner=recorded_job)
    differences = 0
    for name in ("cases.json", "summary.json"):
        old, new = json.loads((kept / name).read_text()), json.loads((Path(fresh["kept"]) / name).read_text())
        if name == "summary.json":  # timing and the device's name are not results
            old, new = ({k: v for k, v in d.items() if k not in ("timing", "device")} for d in (old, new))
        if old != new:
            differences += 1
            print(f"{job['name']}: {name} differs from the kept one")
    print(f"{job['name']}: {'identical' if not differences else 'DIFFERENT'} (summary.json without timing, "
          "cases.json)")
    return 1 if differences else 0


def confirm(args: argparse.Namespace, commit: str, pool: ProcessPoolExecutor | None = None) -> int:
    """Run (or reuse) every confirmation run, then write contest.confirm.{json,md,png} from the kept runs; `pool`:
    run_all's (the smoke's, shared with the select stage)."""
    from medfl.synth import generate

    preset, seeds, replicates = CONFIRMATION, CONFIRMATION_SEEDS, BOOTSTRAP_REPLICATES
    root, kept_root = args.root.resolve() / "confirm", RESULTS / "contest" / "confirm"
    also: tuple[str, ...] = ALSO_CONFIRMED
    if args.smoke:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="contest-confirm-smoke-"))
        kept_root, seeds, replicates, also = root / "kept", 1, 50, ()
        preset = Preset("smoke", scale=0.01, device="cpu", shift="realistic", minimums=(2, 2, 2, 3),
                        sites={"dermoscopy": 2, "prostate": 2},
                        tasks={"dermoscopy": TaskPlan(rounds=2, local_epochs=1, seeds=1,
                                                      overrides={"model": {"width": 0.125}}),
                               "prostate": TaskPlan(rounds=2, local_epochs=1, seeds=1,
                                                    overrides={"data": {"input_size": 32}, "model": {"width": 0.125}})})
        # two methods (the paired differences need prr and one other) on both tasks: 4 tiny runs, the select
        # smoke having run ditto already; the methods confirmed at their defaults take the same code path
        picks, choice_commit = {"local": {"trial": "lr0.01", "options": {"optimizer": {"lr": 0.01}}},
                                "prr": {"trial": "default", "options": {}}}, None
    else:
        choice, choice_commit = committed_choice()
        picks = choice["picks"]
        if commit.endswith("+dirty"):
            raise SystemExit("confirmation runs start from a clean checkout (commit first): every run records its commit")
    for task in preset.tasks:
        generate(root / "synth", **{**preset.generate_arguments(task), "seed": CONFIRMATION_DATA_SEED,
                                    "site_seed": CONFIRMATION_SITE_SEED})
    jobs = [{**job, "commit": commit, "kept": str(kept_root / job["name"])}
            for job in confirmation_jobs(root, args.threads, picks, preset, seeds, also)]
    if args.only:
        chosen = [job for job in jobs if job["name"] in args.only]
        if len(chosen) != len(args.only):
            raise SystemExit(f"unknown run(s); confirmation runs: {', '.join(j['name'] for j in jobs)}")
        return max(reproduce_kept(job, root / "reproduce") for job in chosen)
    print(f"contest, confirm stage: {len(jobs)} runs on {args.workers} workers, commit {commit}", flush=True)
    start = time.perf_counter()
    reused = [result for result in map(kept_result, jobs) if result is not None]
    reused = [result for result in reused if (Path(result["kept"]) / "cases.json").is_file()]
    pending = [job for job in jobs if job["name"] not in {r["name"] for r in reused}]
    print(f"  {len(reused)} finished run(s) reused from {kept_root}", flush=True)
    if not args.report:
        run_all(pending, args.workers, runner=recorded_job, pool=pool)
    results = summarise_confirmation(jobs, rarest_classes(root / "synth", preset), replicates)
    planned = {t: sum(j["task"] == t for j in jobs) for t in preset.tasks}
    finished = {t: sum(j["task"] == t and (Path(j["kept"]) / "cases.json").is_file() for j in jobs)
                for t in preset.tasks}
    text = confirmation_markdown(results, planned, finished, replicates)
    checked = lineage(jobs, choice_commit) if choice_commit else {"choice_commit": None, "smoke": True}
    print(text)
    print(f"lineage: {checked}")
    if args.smoke:  # and the check that a kept run reproduces exactly
        status = reproduce_kept(jobs[0], root / "reproduce")
        shutil.rmtree(root)
        return status
    atomic_write_json(RESULTS / "contest.confirm.json", {
        "stage": "confirm", "federation": f"site-seed {CONFIRMATION_SITE_SEED}, data seed {CONFIRMATION_DATA_SEED}; "
        + preset.data_text(), "picks": picks, "lineage": checked, "planned": planned, "finished": finished,
        "wall_s": time.perf_counter() - start, "results": results,
        "runs": {j["name"]: json.loads((Path(j["kept"]) / "job.json").read_text())
                 for j in jobs if (Path(j["kept"]) / "job.json").is_file()}})
    lineage_line = (f"Every finished run's commit descends from the pre-registration commit {choice_commit[:12]}."
                    if checked["all_descend"] else f"NOT every run descends from {choice_commit[:12]}: "
                    f"{', '.join(checked['violations'])}.")
    atomic_write_text(RESULTS / "contest.confirm.md", (
        "# Contest: the confirmation\n\n`python benchmarks/contest.py --stage confirm`\n\n"
        f"The confirmation federation: `medfl synth --shift realistic --site-seed {CONFIRMATION_SITE_SEED} --seed "
        f"{CONFIRMATION_DATA_SEED}` (other hospitals, other patients; {preset.data_text()}), every compared method at "
        f"its pick (contest.choice.json), seeds 0-{seeds - 1}; fedprox and fml at their defaults, seed 0. "
        f"{lineage_line}\n\n{text}"))
    confirmation_figure(results, RESULTS / "contest.confirm.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spawned runs inherit it: medfl.environment says why
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("select", "confirm"), default="select")
    parser.add_argument("--choose", action="store_true",
                        help="select stage: write the picks (contest.choice.json) from the finished grid")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (default 2: one per core)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--root", type=Path, default=RESULTS / "tmp" / "contest", help="where runs are kept")
    parser.add_argument("--smoke", action="store_true",
                        help="the grid's code path on tiny data, 2 rounds x 1 epoch, nothing written to results/")
    parser.add_argument("--report", action="store_true",
                        help="confirm stage: write the tables from the finished runs, start none")
    parser.add_argument("--only", nargs="+", metavar="RUN",
                        help="confirm stage: rerun these finished runs (e.g. dermoscopy-prr-seed0) from scratch in a "
                             "scratch folder and compare them with the kept ones, exactly; exit 1 on any difference")
    args = parser.parse_args(argv)
    commit = commit_of(BENCHMARKS)
    if args.smoke:  # one worker for both stages' runs, as each new process imports torch and MONAI again (the
        args.workers = 1  # reproduction check still reruns a run in a fresh process of its own)
        if args.stage == "select":
            with worker_pool(1) as pool:
                return select(args, commit, pool)
    if args.stage == "confirm":
        return confirm(args, commit)
    return select(args, commit)


def select(args: argparse.Namespace, commit: str, pool: ProcessPoolExecutor | None = None) -> int:
    """Run (or reuse) every run of the grid, then write contest.select.{json,md} (and, --choose, the picks); the
    smoke goes on to the confirmation stage on the same `pool`."""
    from medfl.synth import generate

    plan, preset, root = REALISTIC_DERMOSCOPY, DEVELOPMENT, args.root.resolve() / "select"
    if args.smoke:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="contest-smoke-"))
        plan = TaskPlan(rounds=2, local_epochs=1, seeds=1, scale=0.01, overrides=REALISTIC_DERMOSCOPY.overrides)
        preset = Preset("smoke", scale=0.01, device="cpu", shift="realistic", tasks={"dermoscopy": plan},
                        sites={"dermoscopy": 2, "prostate": 0})  # 2 sites, as the confirmation smoke's
    generate(root / "synth", **preset.generate_arguments("dermoscopy"))
    grid = {"local": GRID["local"][:2], "ditto": GRID["ditto"][:1]} if args.smoke else GRID
    kept_root = (root / "kept") if args.smoke else RESULTS / "contest" / "select"
    jobs = [{**job, "commit": commit, "kept": str(kept_root / job["name"])}
            for job in selection_jobs(root, args.threads, grid, plan)]
    print(f"contest, select stage: {len(jobs)} runs on {args.workers} workers, commit {commit}", flush=True)
    start = time.perf_counter()
    reused = [result for result in map(kept_result, jobs) if result is not None]
    pending = [job for job in jobs if job["name"] not in {r["name"] for r in reused}]
    print(f"  {len(reused)} finished run(s) reused from {kept_root}", flush=True)
    done = reused + run_all(pending, args.workers, runner=recorded_job, pool=pool)
    picks = choose(jobs, grid)
    text = selection_markdown(picks)
    print(text)
    if args.smoke:
        shutil.rmtree(root)
        return confirm(args, commit, pool)  # the confirmation's code path too, on its own tiny federation
    runs = {d["name"]: {k: d.get(k) for k in ("commit", "started", "wall_s", "cpu_s", "reused")} for d in done}
    result = {"stage": "select", "grid": {m: [t.__dict__ for t in ts] for m, ts in GRID.items()},
              "federation": preset.data_text(), "seed": SELECTION_SEED, "picks": picks, "runs": runs,
              "wall_s": time.perf_counter() - start}
    atomic_write_json(RESULTS / "contest.select.json", result)
    atomic_write_text(RESULTS / "contest.select.md", f"# Contest: the selection grid\n\n{text}\n")
    if args.choose:
        atomic_write_json(CHOICE, {"picked_on": commit, "picks": {m: {"trial": p["pick"], "options": p["options"]}
                                                                  for m, p in picks.items()},
                                   "confirmation": {"site_seed": CONFIRMATION_SITE_SEED,
                                                    "data_seed": CONFIRMATION_DATA_SEED,
                                                    "seeds": CONFIRMATION_SEEDS}})
    return 0



if __name__ == "__main__":
    sys.exit(main())
