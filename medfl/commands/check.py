"""`medfl check SITE_CONFIG...`: validate sites and their data, print per-split, per-class counts.

Every site is checked, even after a bad one. Defaults match `DataSettings`: classes = each site's label-map
targets in first-seen order, input size 64, split 0.7/0.1/0.2 by lesion or case, seed 0, all slices.
Exit status 0 when no site has an error (warnings are allowed, unless --strict), 1 otherwise. Errors: unreadable configs,
missing or corrupt data, unknown labels, bad masks, duplicate ids, no samples, an empty train or validation
split. Warnings: a class absent from a split, an empty test split, a class the label map never produces.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from medfl.config import DataSettings
    from medfl.data import SiteReport


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.7,0.1,0.2, got '{text}'") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.7,0.1,0.2, got '{text}'")
    return values  # type: ignore[return-value]


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `medfl check`."""
    parser.add_argument("configs", nargs="+", metavar="SITE_CONFIG", help="site config YAML files")
    parser.add_argument("--classes", type=_names, default=None,
                        help="class list and order, e.g. nv,bkl,mel (default: each site's label-map targets; "
                             "ignored by segmentation sites)")
    parser.add_argument("--input-size", type=int, default=64, help="in-plane size of slices (default 64)")
    parser.add_argument("--split", type=_fractions, default=(0.7, 0.1, 0.2), metavar="TRAIN,VAL,TEST",
                        help="split fractions by lesion or case (default 0.7,0.1,0.2)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--slices", choices=("all", "foreground"), default="all",
                        help="training slices of volumes: all, or those with prostate plus a share of empty ones")
    parser.add_argument("--workers", type=int, default=2, help="threads reading images (default 2)")
    parser.add_argument("--strict", action="store_true", help="treat warnings as errors (exit status 1)")


def _settings(args: argparse.Namespace) -> DataSettings:
    from medfl.config import DataSettings, validate_model

    data = {"classes": args.classes, "input_size": args.input_size, "split_fractions": args.split,
            "split_seed": args.seed, "slices": args.slices, "num_workers": args.workers}
    return validate_model(DataSettings, data, "command line options")


def _table(report: SiteReport) -> Table:
    """Per-split rows: class counts, images and lesions (classification); cases, slices, prostate (segmentation)."""
    from rich.table import Table

    table = Table(title=f"site '{report.site}' ({report.task})", title_justify="left")
    table.add_column("split")
    if report.task == "classification":
        for name in report.classes:
            table.add_column(name, justify="right")
        table.add_column("images", justify="right")
        table.add_column("lesions", justify="right")
        for split, counts in report.counts.items():
            table.add_row(split, *map(str, counts), str(report.samples[split]), str(report.groups[split]))
    else:
        for name in ("cases", "slices", "slices with prostate", "prostate pixels"):
            table.add_column(name, justify="right")
        for split, (background, prostate) in report.counts.items():
            share = f"{100 * prostate / (background + prostate):.1f}%" if background + prostate else "-"
            table.add_row(split, str(report.groups[split]), str(report.samples[split]),
                          str(report.foreground_slices[split]), share)
    return table


def _print_report(console: Console, report: SiteReport) -> None:
    from rich.text import Text

    console.print(_table(report))
    if report.dropped:
        dropped = ", ".join(f"{label} {count}" for label, count in report.dropped.items())
        console.print(Text(f"dropped rows (null in label_map or not among the classes): {dropped}"), soft_wrap=True)
    if report.filtered_out:
        console.print(Text(f"rows removed by the site's filter: {report.filtered_out}"))
    for problem in report.problems:
        style = "red" if problem.severity == "error" else "yellow"
        console.print(Text(f"{problem.severity}: {problem}", style=style), soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    """Check every site config given; print a table per site and one line per problem."""
    from rich.console import Console
    from rich.text import Text

    from medfl.config import load_site_config
    from medfl.data import inspect_site
    from medfl.errors import MedflError

    console = Console(highlight=False)
    settings = _settings(args)
    classes = ",".join(settings.classes) if settings.classes else "each site's label-map targets"
    fractions = "/".join(f"{f:g}" for f in settings.split_fractions)
    console.print(Text(f"classes: {classes}; input size {settings.input_size}; split {fractions} "
                       f"(seed {settings.split_seed}); training slices: {settings.slices}"), soft_wrap=True)
    failed = 0
    for path in args.configs:
        try:
            report = inspect_site(load_site_config(path), settings).report
        except (MedflError, OSError) as error:
            console.print(Text(f"error: {error}", style="red"), soft_wrap=True)
            failed += 1
            continue
        _print_report(console, report)
        failed += bool(report.errors or (args.strict and report.warnings))
    total = len(args.configs)
    summary = f"{total - failed} of {total} site(s) ready" + (f", {failed} with problems" if failed else "")
    console.print(summary, style="bold red" if failed else "bold green")
    return 1 if failed else 0
