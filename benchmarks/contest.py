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
    python benchmarks/contest.py --stage confirm

Runs go to benchmarks/results/tmp/contest/<stage>/ (interrupted ones are resumed). A finished run's config,
summary and record (the commit it ran on, when it started, its wall and CPU time) are kept in
benchmarks/results/contest/<stage>/<run>/ and committed: a later session reuses a kept run whose config is the
one planned instead of running it again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
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
    deep_merge,
    experiment_dict,
    run_all,
    run_job,
)

from medfl.checkpoints import atomic_write_json, atomic_write_text  # noqa: E402

COMPARED = ("local", "fedavg", "fedbn", "ditto", "pooled", "prr", "fedavg_det")
ALSO_CONFIRMED = ("fedprox", "fml")  # at their defaults, one seed: the earlier baselines, for continuity
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


def commit_of(folder: Path) -> str:
    """The commit the benchmark's code is at (the worktree it runs from), '+dirty' when it has changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()

    head = git("rev-parse", "HEAD")
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


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
    args = parser.parse_args(argv)
    from medfl.synth import generate

    commit = commit_of(BENCHMARKS)
    if args.stage == "confirm":
        raise SystemExit("the confirmation stage starts once the picks are committed (contest.choice.json): "
                         "not yet built")
    plan, preset, root = REALISTIC_DERMOSCOPY, DEVELOPMENT, args.root.resolve() / "select"
    if args.smoke:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="contest-smoke-"))
        plan = TaskPlan(rounds=2, local_epochs=1, seeds=1, scale=0.01, overrides=REALISTIC_DERMOSCOPY.overrides)
        preset = Preset("smoke", scale=0.01, device="cpu", shift="realistic", tasks={"dermoscopy": plan})
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
    done = reused + run_all(pending, args.workers, runner=recorded_job)
    picks = choose(jobs, grid)
    text = selection_markdown(picks)
    print(text)
    if args.smoke:
        import shutil

        shutil.rmtree(root)
        return 0
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
