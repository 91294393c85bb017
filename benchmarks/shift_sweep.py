"""Where personalisation pays: the contest's methods across site-shift strengths (pre-registered, issue 20).

The question a hospital asks `medfl check`: given how different my federation's sites are, which method fits?
This sweep measures it on synthetic federations whose sites differ more or less: the realistic dermoscopy
sites of the contest's development federation (`medfl synth --shift realistic`, scale 0.6, data seed 0,
site-seed 0) at shift strengths STRENGTHS (`--shift-strength`), every method of METHODS at the setting the
contest picked (benchmarks/results/contest.choice.json), seeds SEEDS, both protocols (summary.json holds both).
Strength 1 is the contest's development federation itself: its kept selection runs of the picked trials
(seed 0) are reused where their config is the one planned. The x-axis is what `medfl check` measures on each
federation: its mean site shift (medfl.data.shift). Everything here is committed before the sweep's runs.

    python benchmarks/shift_sweep.py                   # the runs (resumed, kept runs reused), table and figure
    python benchmarks/shift_sweep.py --write-advice    # also medfl/data/shift_regimes.json, once every run exists
    python benchmarks/shift_sweep.py --smoke           # every step on tiny data with default settings, nothing kept

Runs go to benchmarks/results/tmp/shift_sweep/s<strength>/ (interrupted ones are resumed); a finished run's
config, summary and record (commit, start, wall and CPU time, the strength) are kept in
benchmarks/results/shift_sweep/<run>/ and committed, so that later sessions reuse them. Results:
benchmarks/results/shift_sweep.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from contest import DEVELOPMENT, commit_of, kept_result, recorded_job  # noqa: E402 - the sibling scripts
from quality import (  # noqa: E402
    REALISTIC_DERMOSCOPY,
    REPOSITORY,
    RESULTS,
    Preset,
    TaskPlan,
    deep_merge,
    experiment_dict,
    run_all,
    spread,
)

from medfl.checkpoints import atomic_write_json, atomic_write_text  # noqa: E402

# ---- the pre-registration ----------------------------------------------------------------------------------
STRENGTHS = (0.5, 1.5)  # run here, SEEDS each
DEVELOPMENT_STRENGTH = 1.0  # the contest's development federation: its kept selection runs
DEVELOPMENT_SEEDS = (0,)  # the contest's selection ran seed 0 only
SEEDS = (0, 1)
METHODS = ("prr", "fedavg_det", "fedavg", "local", "ditto")
METRIC = "macro_f1"
ADVICE_PROTOCOL = "fine-tuned"  # the figures `medfl check` quotes: each site's model after local training
# Words for the paragraph `medfl check` prints (the fine-tuned protocol: FedAvg is FedAvg with fine-tuning).
LABELS = {"prr": "prr", "fedavg_det": "FedAvg with DET", "fedavg": "FedAvg with fine-tuning",
          "local": "local training", "ditto": "Ditto"}

CHOICE = RESULTS / "contest.choice.json"
KEPT = RESULTS / "shift_sweep"
CONTEST_KEPT = RESULTS / "contest" / "select"
FIGURES = REPOSITORY / "medfl" / "data" / "shift_regimes.json"
STEM = RESULTS / "shift_sweep"


def picks_of(choice: Path, methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each method's picked trial and options, from the contest's committed choice; SystemExit (one line) when
    the choice or a method is missing."""
    if not choice.is_file():
        raise SystemExit(f"{choice} is missing: the sweep runs every method at the setting the contest picked "
                         "(python benchmarks/contest.py --stage select --choose writes it)")
    picks = json.loads(choice.read_text())["picks"]
    missing = [method for method in methods if method not in picks]
    if missing:
        raise SystemExit(f"{choice} has no pick for {', '.join(missing)}")
    return {method: {"trial": picks[method]["trial"], "options": picks[method]["options"]} for method in methods}


def data_arguments(preset: Preset, strength: float) -> dict[str, Any]:
    """`medfl.synth.generate`'s arguments of the federation at `strength`."""
    return {**preset.generate_arguments("dermoscopy"), "shift_strength": strength}


def plan_jobs(root: Path, threads: int, picks: dict[str, dict[str, Any]], plan: TaskPlan,
              strengths: dict[float, tuple[int, ...]], kept: Path, contest_kept: Path) -> list[dict[str, Any]]:
    """Every (strength, method, seed) run. Strength 1's runs carry the contest's run names, so that its kept
    selection runs are found; the others are named with their strength."""
    import yaml

    jobs = []
    for strength, seeds in strengths.items():
        folder = root / f"s{strength:g}"
        for method in picks:
            trial, options = picks[method]["trial"], picks[method]["options"]
            for seed in seeds:
                prefix = "dermoscopy" if strength == DEVELOPMENT_STRENGTH else f"dermoscopy-s{strength:g}"
                name = f"{prefix}-{method}-{trial}-seed{seed}"
                config = deep_merge(experiment_dict("dermoscopy", plan, method, seed, folder / "synth", threads, "cpu"),
                                    options)
                path = folder / "configs" / f"{name}.yaml"
                atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
                jobs.append({"name": name, "task": "dermoscopy", "method": method, "label": trial, "seed": seed,
                             "strength": strength, "threads": threads, "config": str(path),
                             "run_dir": str(folder / "runs" / name), "kept": str(kept / name),
                             "contest_kept": str(contest_kept / name) if strength == DEVELOPMENT_STRENGTH else None})
    return jobs


def reused(job: dict[str, Any]) -> dict[str, Any] | None:
    """A finished kept run of this plan: the contest's (strength 1) or the sweep's own, whose record names the same
    strength (the configs of two strengths differ only in where their data lie)."""
    if job["contest_kept"]:
        found = kept_result({**job, "kept": job["contest_kept"]})
        if found is not None:
            return {**found, "kept": job["contest_kept"]}
    found = kept_result(job)
    if found is not None and found.get("shift_strength") == job["strength"]:
        return found
    return None


def sweep_job(job: dict[str, Any]) -> dict[str, Any]:
    """contest.recorded_job, with the federation's strength added to the kept record."""
    result = recorded_job(job)
    record = Path(job["kept"]) / "job.json"
    atomic_write_json(record, {**json.loads(record.read_text()), "shift_strength": job["strength"]})
    return {**result, "shift_strength": job["strength"]}


def measured_shift(synth: Path) -> dict[str, Any]:
    """What `medfl check` measures on the federation's dermoscopy sites (medfl.data.shift): each site's shift, the
    mean (the federation's figure) and the mean distance of every compared statistic."""
    from medfl.config import DataSettings, load_site_config
    from medfl.data import inspect_site
    from medfl.data.shift import DERMOSCOPY, site_shift
    from medfl.tasks import task_for

    settings = DataSettings(classes=["nv", "bkl", "mel"], num_workers=1)
    measured = {}
    for path in sorted((synth / "site_configs" / "dermoscopy").glob("*.yaml")):
        config = load_site_config(path)
        measured[config.name] = inspect_site(config, settings, task=task_for(config.task)).report.statistics.compared
    shift = site_shift(measured)
    return {"mean_shift": shift.mean_shift, "sites": dict(zip(shift.sites, map(float, shift.shift), strict=True)),
            "statistics": dict(zip(DERMOSCOPY.compared, map(float, shift.distances.mean(axis=0)), strict=True)),
            "kind": DERMOSCOPY.title, "compared": list(DERMOSCOPY.compared)}


def scores_of(kept: Path) -> dict[str, float]:
    """A run's test score, mean over sites, under both protocols."""
    summary = json.loads((kept / "summary.json").read_text())
    return {"fine-tuned": float(summary["mean"]["test"][METRIC]),
            "reference": float(summary["reference_protocol"]["mean"]["test"][METRIC])}


def summarise(jobs: list[dict[str, Any]], done: list[dict[str, Any]], shifts: dict[float, dict[str, Any]],
              methods: tuple[str, ...]) -> dict[str, Any]:
    """Per strength: the measured shift; per method and protocol, the score of every seed, mean and sample SD; the
    paired differences of prr from every other method."""
    where = {d["name"]: Path(d["kept"]) for d in done}
    regimes = []
    for strength in sorted(shifts):
        scores: dict[str, dict[str, dict[int, float]]] = {"fine-tuned": {}, "reference": {}}
        for job in (j for j in jobs if j["strength"] == strength):
            for protocol, value in scores_of(where[job["name"]]).items():
                scores[protocol].setdefault(job["method"], {})[job["seed"]] = value
        seeds = sorted({seed for values in scores["fine-tuned"].values() for seed in values})
        entry = {"strength": strength, **shifts[strength], "seeds": seeds, "protocols": {}}
        for protocol, by_method in scores.items():
            methods_here = {m: {"per_seed": [by_method[m][s] for s in seeds], **spread([by_method[m][s] for s in seeds])}
                            for m in methods if m in by_method}
            paired = {}
            if "prr" in by_method:
                for other in methods_here:
                    if other != "prr":
                        paired[f"prr - {other}"] = spread([by_method["prr"][s] - by_method[other][s] for s in seeds])
            entry["protocols"][protocol] = {"methods": methods_here, "paired": paired}
        regimes.append(entry)
    return {"metric": METRIC, "methods": list(methods), "regimes": regimes}


def _cell(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "-"
    sd = f" ± {entry['sd']:.3f}" if entry["sd"] is not None else ""
    return f"{entry['mean']:.3f}{sd} ({entry['n']})"


def markdown(result: dict[str, Any]) -> str:
    """Per protocol: methods by strength (mean ± sd over seeds, number of seeds), then prr's paired differences."""
    regimes = result["regimes"]
    header = [f"s = {r['strength']:g} (mean site shift {r['mean_shift']:.2f})" for r in regimes]
    lines = []
    for protocol in ("fine-tuned", "reference"):
        lines += [f"Test macro-F1, mean over sites, {protocol} protocol (mean ± sd over seeds (seeds)):", "",
                  "| method | " + " | ".join(header) + " |", "|:---|" + "---:|" * len(regimes)]
        for method in result["methods"]:
            cells = [_cell(r["protocols"][protocol]["methods"][method]) if method in r["protocols"][protocol]["methods"]
                     else "-" for r in regimes]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        pairs = sorted({name for r in regimes for name in r["protocols"][protocol]["paired"]})
        for pair in pairs:
            cells = [_cell(r["protocols"][protocol]["paired"][pair]) if pair in r["protocols"][protocol]["paired"]
                     else "-" for r in regimes]
            lines.append(f"| {pair} (paired by seed) | " + " | ".join(cells) + " |")
        lines.append("")
    statistics_header = list(regimes[0]["statistics"]) if regimes else []
    lines += ["Measured site shift (`medfl check`'s meter): mean distance over sites per statistic, and the mean "
              "site shift:", "", "| strength | " + " | ".join(statistics_header) + " | mean site shift |",
              "|---:|" + "---:|" * (len(statistics_header) + 1)]
    for r in regimes:
        lines.append(f"| {r['strength']:g} | " + " | ".join(f"{v:.2f}" for v in r["statistics"].values())
                     + f" | {r['mean_shift']:.2f} |")
    return "\n".join(lines)


def figure(result: dict[str, Any], path: Path) -> None:
    """Test score against the measured mean site shift, one line per method, the seeds' spread as error bars; one
    panel per protocol."""
    from matplotlib.figure import Figure

    from medfl.report.plots import save_png

    canvas = Figure(figsize=(10, 4), layout="constrained")
    for axis, protocol in zip(canvas.subplots(1, 2), ("fine-tuned", "reference"), strict=True):
        for index, method in enumerate(result["methods"]):
            points = [(r["mean_shift"], r["protocols"][protocol]["methods"][method]) for r in result["regimes"]
                      if method in r["protocols"][protocol]["methods"]]
            x = [shift + 0.01 * (index - 2) for shift, _ in points]  # side by side where error bars overlap
            y = [entry["mean"] if entry["mean"] is not None else math.nan for _, entry in points]
            errors = [entry["sd"] or 0.0 for _, entry in points]
            axis.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=method,
                          color="C3" if method == "prr" else f"C{index}")
        for r in result["regimes"]:
            axis.annotate(f"s={r['strength']:g}", (r["mean_shift"], 0), xycoords=("data", "axes fraction"),
                          xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8, color="0.4")
        axis.set_xlabel("mean site shift (medfl check)")
        axis.set_ylabel(f"test {METRIC.replace('_', '-')}, mean over sites")
        axis.set_title(f"{protocol} protocol", fontsize=10)
    axis.legend(fontsize=8)
    save_png(canvas, path)


def advice_figures(result: dict[str, Any], commit: str, run_commits: list[str], federation: str) -> dict[str, Any]:
    """The JSON object `medfl check` ships (medfl.data.regimes): each strength's measured mean shift and every
    method's fine-tuned-protocol score per seed."""
    regimes = []
    for r in result["regimes"]:
        methods = r["protocols"][ADVICE_PROTOCOL]["methods"]
        regimes.append({"strength": r["strength"], "mean_shift": r["mean_shift"], "seeds": r["seeds"],
                        "scores": {m: entry["per_seed"] for m, entry in methods.items()},
                        "reference_scores": {m: entry["per_seed"] for m, entry in
                                             r["protocols"]["reference"]["methods"].items()}})
    kind, compared = result["regimes"][0]["kind"], result["regimes"][0]["compared"]
    return {"measured": True, "note": f"benchmarks/shift_sweep.py on {federation}", "commit": commit,
            "run_commits": run_commits, "kind": kind, "statistics": compared, "metric": METRIC,
            "protocol": ADVICE_PROTOCOL, "labels": LABELS, "regimes": regimes}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spawned runs inherit it: medfl.environment says why
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (default 2: one per core)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1, as the contest)")
    parser.add_argument("--root", type=Path, default=RESULTS / "tmp" / "shift_sweep", help="where runs are made")
    parser.add_argument("--write-advice", action="store_true",
                        help=f"write {FIGURES.relative_to(REPOSITORY)} from the kept runs (every run must exist)")
    parser.add_argument("--smoke", action="store_true",
                        help="every step on tiny data, 2 sites, strengths 0.5 and 1, prr and fedavg at their "
                             "defaults, one seed, 2 rounds x 1 epoch, one worker; nothing written to results/ or medfl/")
    args = parser.parse_args(argv)
    from medfl.data.regimes import check_advice, figures_from_dict
    from medfl.synth import generate

    commit = commit_of(BENCHMARKS)
    root, kept, contest_kept, stem, figures_path = args.root.resolve(), KEPT, CONTEST_KEPT, STEM, FIGURES
    preset, plan, methods = DEVELOPMENT, REALISTIC_DERMOSCOPY, METHODS
    strengths = {**{s: SEEDS for s in STRENGTHS}, DEVELOPMENT_STRENGTH: DEVELOPMENT_SEEDS}
    if args.smoke:
        root = Path(tempfile.mkdtemp(prefix="shift-sweep-smoke-"))
        kept, contest_kept, stem, figures_path = root / "kept", root / "contest", root / "shift_sweep", root / "f.json"
        plan = TaskPlan(rounds=2, local_epochs=1, seeds=1, scale=0.01, overrides=REALISTIC_DERMOSCOPY.overrides)
        preset = Preset("smoke", scale=0.01, device="cpu", shift="realistic", tasks={"dermoscopy": plan},
                        sites={"dermoscopy": 2, "prostate": 0})
        # one strength of the sweep's own and the development one: the two ways a run is named, found and kept
        methods, strengths = ("prr", "fedavg"), {0.5: (0,), DEVELOPMENT_STRENGTH: (0,)}
        picks = {method: {"trial": "default", "options": {}} for method in methods}
        args.workers = 1  # a second worker would import torch and MONAI again for seconds of tiny runs
    else:
        picks = picks_of(CHOICE, methods)
    start = time.perf_counter()
    shifts = {}
    for strength in strengths:
        synth = root / f"s{strength:g}" / "synth"
        generate(synth, **data_arguments(preset, strength))
        shifts[strength] = measured_shift(synth)
        print(f"strength {strength:g}: mean site shift {shifts[strength]['mean_shift']:.2f}", flush=True)
    jobs = [{**job, "commit": commit} for job in plan_jobs(root, args.threads, picks, plan, strengths, kept, contest_kept)]
    print(f"shift sweep: {len(jobs)} runs on {args.workers} workers, commit {commit}", flush=True)
    found = [result for result in map(reused, jobs) if result is not None]
    pending = [job for job in jobs if job["name"] not in {r["name"] for r in found}]
    print(f"  {len(found)} finished run(s) reused from {kept} and {contest_kept}", flush=True)
    done = found + run_all(pending, args.workers, runner=sweep_job)
    if args.smoke:  # a second pass finds every run kept: the reuse path of a later session
        again = [reused(job) for job in jobs]
        assert all(again), [job["name"] for job, result in zip(jobs, again, strict=True) if result is None]
    result = summarise(jobs, done, shifts, methods)
    text = markdown(result)
    print(text)
    runs = {d["name"]: {k: d.get(k) for k in ("commit", "started", "wall_s", "cpu_s", "reused", "kept")} for d in done}
    federation = (f"the realistic dermoscopy federation at shift strengths {', '.join(f'{s:g}' for s in sorted(strengths))}"
                  f" ({preset.data_text()}, shift_strength=s)")
    atomic_write_json(stem.parent / f"{stem.name}.json",
                      {"strengths": {f"{s:g}": list(seeds) for s, seeds in strengths.items()}, "methods": list(methods),
                       "picks": picks, "federation": federation, "commit": commit, "runs": runs, "result": result,
                       "wall_s": time.perf_counter() - start})
    atomic_write_text(stem.parent / f"{stem.name}.md", f"# Shift sweep\n\n{federation}; commit {commit}\n\n{text}\n")
    figure(result, stem.parent / f"{stem.name}.png")
    if args.write_advice or args.smoke:
        if commit.endswith("+dirty") and not args.smoke:
            raise SystemExit(f"the checkout has uncommitted changes ({commit}): the figures must name a commit")
        run_commits = sorted({str(d.get("commit")) for d in done})
        figures = advice_figures(result, commit.removesuffix("+dirty"), run_commits, federation)
        atomic_write_json(figures_path, figures)
        loaded = figures_from_dict(json.loads(figures_path.read_text()))
        shift = result["regimes"][-1]["mean_shift"]
        print(f"advice from the {'smoke ' if args.smoke else ''}figures at mean site shift {shift:.2f}: "
              f"{check_advice(loaded, loaded.kind, loaded.statistics, shift, 4)}")
    if args.smoke:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
