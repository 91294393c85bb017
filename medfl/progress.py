"""The run's progress display (rich, per round, site and epoch, with an ETA) and its final table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class ProgressDisplay:
    """Receives the coordinator's events; live bars on a terminal, plain lines in quiet mode or in logs.

    On a terminal: one line for the run (rounds done, its ETA) and one line per site for the current round (its
    epoch, DET state and scores, the ETA of its round), so that sites training side by side
    (`runtime.parallel_sites`) each show where they are."""

    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.quiet = quiet or not self.console.is_terminal
        self.progress: Progress | None = None
        self.task = None  # the run's line
        self.site_tasks: dict[str, Any] = {}  # one line per site, reset every round
        self.state: dict[str, Any] = {}

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def event(self, kind: str, info: dict[str, Any]) -> None:
        getattr(self, f"_on_{kind}")(info)

    def _on_start(self, info: dict[str, Any]) -> None:
        self.state = dict(info)
        remaining = (info["rounds"] - info["start"]) * len(info["sites"]) * info["epochs"]
        if not self.quiet:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(f"run: round {info['start']} of {info['rounds']}", total=remaining)
            for site in info["sites"]:
                self._site_task(site)
        else:
            self.console.print(f"rounds {info['start']}..{info['rounds'] - 1}, sites {', '.join(info['sites'])}")

    def _site_task(self, site: str) -> Any:
        """The site's line (made on first sight: pooled training reports under its own name)."""
        if site not in self.site_tasks and self.progress is not None:
            self.site_tasks[site] = self.progress.add_task(f"  {site}: waiting", total=self.state.get("epochs", 1))
        return self.site_tasks.get(site)

    def _on_site(self, info: dict[str, Any]) -> None:
        self.state.update(info)

    def _on_epoch(self, info: dict[str, Any]) -> None:
        if self.progress is None or self.task is None:
            return
        task = self._site_task(info["site"])
        if info["epoch"] == 1:  # a new round at this site: its line counts this round's epochs
            self.progress.reset(task, total=self.state.get("epochs", 1))
        phis = "  ".join(f"{k[4:]} {v:.3f}" for k, v in info.items() if k.startswith("phi_"))
        state = f" [{info['state']}]" if info.get("state") else ""
        self.progress.update(task, advance=1,
                             description=f"  {info['site']}: round {info['round']} epoch {info['epoch']}{state} {phis}")
        self.progress.update(self.task, advance=1, description=f"run: round {info['round']} of {self.state['rounds']}")

    def _on_round(self, info: dict[str, Any]) -> None:
        mean = info["summary"].get("mean", {}).get("test", {})
        metric = info["summary"].get("metric", "")
        timing = info["timing"]
        line = (f"round {info['round']}: mean test {metric} {mean.get(metric, math.nan):.4f}  "
                f"train {timing['train_s']:.1f}s eval {timing['eval_s']:.1f}s aggregation {timing['aggregation_s']:.3f}s")
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            self.console.print(line)

    def _on_end(self, info: dict[str, Any]) -> None:
        self.stop()


def print_summary(summary: dict[str, Any], run_dir: Path, console: Console | None = None) -> None:
    """Per-site table of the used model's test metrics at its selected round, and the mean."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)  # logs and pipes: never squeeze the table into 80 columns
    sites = summary.get("sites", {})
    if not sites:
        return
    metrics = list(next(iter(sites.values()))["test"])
    shown = [m for m in metrics if not m.startswith("f1_")] + [m for m in metrics if m.startswith("f1_")]
    table = Table(title=f"{summary['experiment']} ({summary['method']}): test metrics at each site's selected round")
    table.add_column("site")
    table.add_column("round", justify="right")
    for metric in shown:
        table.add_column(metric, justify="right")
    table.add_column("retrogress", justify="right")
    table.add_column("dips", justify="right")
    for site, result in sites.items():
        table.add_row(site, str(result["selected_round"]), *[_fmt(result["test"][m]) for m in shown],
                      _fmt(result["retrogress"]), _fmt(result["curve_dips"]))
    mean = summary["mean"]
    table.add_row("mean", "", *[_fmt(mean["test"][m]) for m in shown], _fmt(mean["retrogress"]),
                  _fmt(mean["curve_dips"]), style="bold")
    console.print(table)
    console.print(f"run folder: {run_dir}")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return str(int(value))  # counts such as num_cases and hd95_missing
    return f"{value:.3f}" if isinstance(value, float) else str(value)
