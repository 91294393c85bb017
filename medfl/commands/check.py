"""`medfl check SITE_CONFIG...` (or `--experiment EXPERIMENT`, its sites with its data settings): validate sites and
their data, print per-split, per-class counts and site shift; with --experiment, what the task says about the
experiment as a whole (3-D: spacing, the patch against each site's smallest volume, one batch's memory, and an
error when that batch cannot fit into the memory the experiment's device has available).

Every site is checked, even after a bad one. Defaults match `DataSettings`: classes = each site's label-map
targets in first-seen order (segmentation sites: always background and prostate), input size 64, split
0.7/0.1/0.2 by lesion or case, seed 0, all slices. After the sites, per modality: with several sites, each
site's distance from the pooled sites in within-site standard deviations (medfl.data.shift), their mean (the
federation's one figure), a paragraph on what the shift sweep measured at that shift (medfl.data.regimes) and
the site means; with one site, its own statistics and one line saying why there is no advice.
Exit status 0 when no site has an error (warnings are allowed, unless --strict) and the experiment fits in
memory, 1 otherwise. Errors: unreadable configs,
missing or corrupt data, unknown labels, bad masks, duplicate ids, no samples, an empty train or validation
split. Warnings: a class absent from a split, an empty test split, a class the label map never produces.
Tables and the summary go to stdout, error and warning lines to stderr.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from medfl.config import DataSettings, SiteConfig
    from medfl.data import SiteReport
    from medfl.data.shift import SampleStatistics, StatisticSet
    from medfl.errors import MedflError
    from medfl.tasks import Task


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
    parser.add_argument("configs", nargs="*", metavar="SITE_CONFIG", help="site config YAML files")
    parser.add_argument("--experiment", metavar="EXPERIMENT",
                        help="check an experiment's sites with its data settings (then SITE_CONFIG and the data "
                             "options below are not used); a 3-D experiment also says how its volumes meet the "
                             "patch and what one training batch needs in memory")
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


def _print_report(console: Console, messages: Console, report: SiteReport, task: Task) -> None:
    from rich.text import Text

    console.print(task.check_table(report))
    if report.dropped:
        dropped = ", ".join(f"{label} {count}" for label, count in report.dropped.items())
        console.print(Text(f"dropped rows (null in label_map or not among the classes): {dropped}"), soft_wrap=True)
    if report.filtered_out:
        console.print(Text(f"rows removed by the site's filter: {report.filtered_out}"))
    for problem in report.problems:
        style = "red" if problem.severity == "error" else "yellow"
        messages.print(Text(f"{problem.severity}: {problem}", style=style), soft_wrap=True)


def _header(settings: DataSettings, tasks: set[str]) -> str:
    """The settings line: the classes of each task present (prefixed by the task when there are several),
    input size, split, and what else each task states (segmentation: the training slices)."""
    from medfl.task_facts import FACTS

    present = [task for key, task in FACTS.items() if key in tasks]
    parts = [f"{task.key.value + ' ' if len(present) > 1 else ''}classes: {task.check_classes(settings)}"
             for task in present]
    fractions = "/".join(f"{f:g}" for f in settings.split_fractions)
    size = f"input size {settings.input_size}" if settings.dims == 2 else "3-D volumes"
    parts.append(f"{size}; split {fractions} (seed {settings.split_seed})")
    parts += [line for task in present for line in task.check_settings(settings)]
    return "; ".join(parts)


def _number(value: float) -> str:
    """A statistic with two or three significant digits; '-' when missing, 'inf' when unbounded."""
    if value != value:
        return "-"
    if abs(value) == float("inf"):
        return "inf"
    size = abs(value)
    return (f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10
            else f"{value:.2f}" if size >= 0.1 or size == 0 else f"{value:.2g}")


def _distance(value: float) -> str:
    """A distance in within-site SDs, two decimals."""
    return "-" if value != value else f"{value:.2f}"


def _rows_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, list[float]]],
                number: Callable[[float], str] = _number) -> Table:
    """One row per (label, values) under `columns`, numbers right-aligned."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("", overflow="fold")  # a site name is folded in a narrow terminal, never cut
    for column in columns:
        table.add_column(column, justify="right")
    for label, values in rows:
        table.add_row(label, *map(number, values))
    return table


def _one_site(site: str, statistics: SampleStatistics) -> list[Table | Text | str]:
    """A lone site's own statistics: mean, SD, minimum and maximum over its samples; why there is no advice."""
    from rich.text import Text

    from medfl.data.regimes import check_advice, shipped_figures
    from medfl.data.shift import describe

    kind, rows = statistics.kind, ("mean", "SD", "min", "max")
    compared, shown = describe(statistics.compared), describe(statistics.shown)
    title = f"site '{site}': {kind.title} ({len(statistics.values)} samples)"
    return [_rows_table(title, kind.compared, [(r, list(v)) for r, v in zip(rows, compared, strict=True)]),
            _rows_table(f"site '{site}': acquisition", kind.shown,
                        [(r, list(v)) for r, v in zip(rows, shown, strict=True)]),
            kind.legend, Text(check_advice(shipped_figures(), kind.title, kind.compared, None, 1))]


def _several_sites(measured: dict[str, SampleStatistics]) -> list[Table | Text | str]:
    """Distances from the pooled sites (per compared statistic, and their RMS), their mean and the advice drawn
    from it, then every site's means."""
    import numpy as np
    from rich.text import Text

    from medfl.data.regimes import check_advice, shipped_figures
    from medfl.data.shift import describe, site_shift

    kind = next(iter(measured.values())).kind
    shift = site_shift({site: statistics.compared for site, statistics in measured.items()})
    samples = sum(len(statistics.values) for statistics in measured.values())
    distances = _rows_table(
        f"site shift, {kind.title}: distance from the pooled {len(measured)} sites ({samples} samples), "
        "in within-site SDs", (*kind.compared, "shift (RMS)"),
        [(site, [*shift.distances[i], shift.shift[i]]) for i, site in enumerate(shift.sites)], _distance)
    note = ("distance = |site mean - pooled mean| / pooled within-site SD, per statistic; shift = their root "
            "mean square. 0: the site looks like the pooled sites; 1: one typical within-site spread away.")
    mean = f"mean site shift: {_distance(shift.mean_shift)} (the mean of the sites' shifts: the federation's figure)"
    advice = check_advice(shipped_figures(), kind.title, kind.compared, shift.mean_shift, len(measured))
    means = _rows_table(f"{kind.title}: site means", kind.compared,
                        [*((site, list(row)) for site, row in zip(shift.sites, shift.site_means, strict=True)),
                         ("pooled", list(shift.pooled_mean)), ("within-site SD", list(shift.within_sd))])
    pooled = describe(np.concatenate([statistics.shown for statistics in measured.values()]))[0]
    acquisition = _rows_table("acquisition (shown, not compared): site means", kind.shown,
                              [*((site, list(describe(s.shown)[0])) for site, s in measured.items()),
                               ("pooled", list(pooled))])
    return [distances, note, Text(mean, style="bold"), Text(advice), means, acquisition, kind.legend]


def _print_shift(console: Console, reports: list[SiteReport]) -> None:
    """Per modality: several sites -> distances and means; one site -> its own statistics."""
    from rich.text import Text

    groups: dict[StatisticSet, dict[str, SampleStatistics]] = {}
    for report in reports:
        if report.statistics is not None and len(report.statistics.values):
            group = groups.setdefault(report.statistics.kind, {})
            name = report.site if report.site not in group else f"{report.site} #{len(group) + 1}"
            group[name] = report.statistics
    for measured in groups.values():
        parts = _one_site(*next(iter(measured.items()))) if len(measured) == 1 else _several_sites(measured)
        for part in parts:
            console.print(Text(part, style="dim") if isinstance(part, str) else part,
                          soft_wrap=isinstance(part, str | Text))


def _load(path: str) -> SiteConfig | MedflError | OSError:
    """The site config, or why it cannot be read (printed in its turn, after the header)."""
    from medfl.config import load_site_config
    from medfl.errors import MedflError

    try:
        return load_site_config(path)
    except (MedflError, OSError) as error:
        return error


def _experiment(args: argparse.Namespace):
    """The experiment of --experiment (None without it); site configs alongside it are a usage error."""
    from medfl.errors import ConfigError

    if args.experiment is None:
        if not args.configs:
            raise ConfigError("name the site configs to check, or an experiment with --experiment")
        return None
    if args.configs:
        raise ConfigError("--experiment checks the experiment's own sites: give no site configs with it")
    from medfl.experiment import load_experiment_config

    return load_experiment_config(args.experiment)


def run(args: argparse.Namespace) -> int:
    """Check every site config given (or an experiment's); print a table per site, one line per problem, then
    the site shift, and with --experiment what the task says about the experiment as a whole."""
    from rich.text import Text

    from medfl.commands import output_console
    from medfl.errors import MedflError

    console, messages = output_console(), output_console(stderr=True)
    experiment = _experiment(args)
    settings = experiment.data if experiment is not None else _settings(args)
    paths = [str(path) for path in experiment.sites] if experiment is not None else args.configs
    configs = [_load(path) for path in paths]
    tasks = {config.task for config in configs if not isinstance(config, Exception)}
    console.print(Text(_header(settings, tasks)), soft_wrap=True)
    failed = 0
    reports, read = [], []
    for config in configs:
        try:
            if isinstance(config, Exception):
                raise config  # a config that did not load: reported in the order given
            from medfl.data import inspect_site  # the readers (SimpleITK, nibabel): once a config is good
            from medfl.tasks import task_for

            task = task_for(config.task, experiment or settings)
            data = inspect_site(config, settings, task=task)
        except (MedflError, OSError) as error:
            messages.print(Text(f"error: {error}", style="red"), soft_wrap=True)
            failed += 1
            continue
        report = data.report
        _print_report(console, messages, report, task)
        reports.append(report)
        read.append(data)
        failed += bool(report.errors or (args.strict and report.warnings))
    _print_shift(console, reports)
    refusal = None
    if experiment is not None:
        from medfl.tasks import task_for

        whole = task_for(experiment.task, experiment)
        for line in whole.experiment_check(experiment, read):
            console.print(Text(line), soft_wrap=True)
        try:
            refusal = whole.memory_refusal(experiment)
        except MedflError as error:  # the experiment's device cannot be used here (cuda without a GPU)
            refusal = str(error)
        if refusal:
            messages.print(Text(f"error: {refusal}", style="red"), soft_wrap=True)
    total = len(paths)
    summary = f"{total - failed} of {total} site(s) ready" + (f", {failed} with problems" if failed else "")
    summary += "; the experiment's training does not fit in memory (above)" if refusal else ""
    console.print(summary, style="bold red" if failed or refusal else "bold green")
    return 1 if failed or refusal else 0
