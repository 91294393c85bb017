"""`medfl export RUN_DIR`: one deliverable folder per site (weights, torch.export program, manifest), or with
`--format bundle` one MONAI bundle per site (runs with `python -m monai.bundle run`, without medfl)."""

from __future__ import annotations

import argparse

from medfl.commands import existing_folder, folder_to_write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder written by `medfl run`")
    parser.add_argument("--out", help="export folder (default: RUN_DIR/export, or RUN_DIR/bundle with --format "
                                      "bundle); one sub-folder per site")
    parser.add_argument("--format", choices=("medfl", "bundle"), default="medfl",
                        help="medfl: the files `medfl predict` and `medfl evaluate` read (default); bundle: a MONAI "
                             "bundle per site, run with `python -m monai.bundle run` (needs no medfl)")
    parser.add_argument("--round", default="best",
                        help="best (the run's selection, default), last, or a round number (0-based)")
    parser.add_argument("--model", choices=("personalized", "deputy"), default="personalized",
                        help="personalized: the model the site uses (default); deputy: the model it shares "
                             "with the federation, for a hospital that did not take part")
    parser.add_argument("--site", action="append", dest="sites", metavar="NAME",
                        help="export only this site (repeatable; default: every site)")


def run(args: argparse.Namespace) -> int:
    """Export; export_run checks the run folder, the sites, the round and --out before torch and MONAI load."""
    existing_folder(args.run_dir, "run folder")
    if args.out:
        folder_to_write(args.out, "--out")
    from medfl.runfolder import RunFolder

    config = RunFolder.open(args.run_dir).config()

    from medfl.deliver import export_run
    from medfl.tasks import task_for

    def report(export) -> None:
        manifest = export.manifest
        scores = manifest["metrics"]
        metric = scores["metric"]
        print(f"{export.site}: {manifest['model']['role']} model {manifest['model']['name']} of round "
              f"{manifest['round']['selected']} (val {metric} {_number(scores['validation'].get(metric))}, "
              f"test {metric} {_number(scores['test'].get(metric))}) -> {export.folder}")

    task = task_for(config.task, config)  # the run's own task exports it (3-D: with its patch and sliding window)
    export_run(args.run_dir, out=args.out, round_=args.round, role=args.model, sites=args.sites, on_site=report,
               export_format=args.format, task=task)
    return 0


def _number(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"
