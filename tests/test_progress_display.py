"""The run's progress display: one line per site, so that sites training side by side each show where they are."""

from __future__ import annotations

import io

from rich.console import Console

from medfl.progress import ProgressDisplay


def _terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=160)


def _epoch(site: str, round_: int, epoch: int, **extra) -> dict:
    return {"site": site, "round": round_, "epoch": epoch, **extra}


def test_each_site_has_its_own_line_that_counts_its_rounds_epochs_in_any_order() -> None:
    display = ProgressDisplay(console=_terminal())
    display.event("start", {"rounds": 3, "start": 1, "sites": ["a", "b"], "epochs": 2})
    # Workers report as they finish: b's epochs may come before a's.
    for info in (_epoch("b", 1, 1), _epoch("a", 1, 1, state="recover", phi_P=0.5), _epoch("b", 1, 2), _epoch("a", 1, 2)):
        display.event("epoch", info)
    tasks = {task.id: task for task in display.progress.tasks}
    run, a, b = tasks[display.task], tasks[display.site_tasks["a"]], tasks[display.site_tasks["b"]]
    assert (run.completed, run.total) == (4, 8)  # rounds 1 and 2 of 3, two sites, two epochs
    assert (a.completed, a.total, b.completed) == (2, 2, 2)
    display.event("epoch", _epoch("a", 2, 1, state="exchange", phi_P=0.625, phi_D=0.25))
    tasks = {task.id: task for task in display.progress.tasks}
    a, b = tasks[display.site_tasks["a"]], tasks[display.site_tasks["b"]]
    assert a.completed == 1 and "round 2 epoch 1 [exchange] P 0.625  D 0.250" in a.description
    assert b.completed == 2 and "round 1 epoch 2" in b.description  # b has not started round 2 yet
    display.stop()


def test_a_site_not_announced_at_the_start_gets_a_line_and_quiet_mode_prints_plain_lines() -> None:
    display = ProgressDisplay(console=_terminal())
    display.event("start", {"rounds": 1, "start": 0, "sites": ["a"], "epochs": 1})
    display.event("epoch", _epoch("pooled", 0, 1))
    assert "pooled" in display.site_tasks
    display.stop()
    console = Console(file=io.StringIO(), force_terminal=True, no_color=True, highlight=False, width=160)
    quiet = ProgressDisplay(quiet=True, console=console)
    quiet.event("start", {"rounds": 2, "start": 0, "sites": ["a", "b"], "epochs": 1})
    quiet.event("epoch", _epoch("a", 0, 1))
    assert quiet.progress is None and "rounds 0..1, sites a, b" in console.file.getvalue()
