"""What the shift sweep measured, and the advice `medfl check` draws from it for a federation's site shift.

The figures ship inside the package as `shift_regimes.json` (benchmarks/ is not in the wheel), written by
`benchmarks/shift_sweep.py --write-advice` from the sweep's kept runs and carrying the commit they came from.
Until the sweep has run, the file says that no measurement exists and `medfl check` says so; it never invents
a number.

A regime is one shift strength of the sweep: the mean site shift `medfl check` measured on its federation and,
per method, the test score (mean over sites) of every seed. A federation falls in the regime whose measured
mean shift is nearest to its own. The rule (`advice`): in that regime take the leading method and the
runner-up, and their paired difference by seed (mean ± sample SD). The benchmark can tell something only where
that difference changes between regimes by more than the seeds' spread (the largest SD of the difference in
any regime): then the paragraph says what was measured at this shift; otherwise it says the benchmark could
not tell.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

FIGURES_FILE = "shift_regimes.json"
METRIC_WORDS = {"macro_f1": "macro-F1", "dice": "Dice"}


@dataclass(frozen=True)
class Regime:
    """One strength of the sweep: its measured mean site shift and each method's test score per seed."""

    strength: float
    mean_shift: float
    seeds: tuple[int, ...]
    scores: Mapping[str, Sequence[float]]  # method -> score of each seed, in `seeds` order


@dataclass(frozen=True)
class Figures:
    """The shipped figures: `measured` False (and `regimes` empty) until the sweep has run."""

    measured: bool
    note: str = ""
    commit: str | None = None
    kind: str = ""  # the title of the meter's statistics (medfl.data.shift.StatisticSet.title)
    statistics: tuple[str, ...] = ()  # the compared statistics of the meter that measured the regimes
    metric: str = "macro_f1"
    protocol: str = "fine-tuned"
    labels: Mapping[str, str] = field(default_factory=dict)  # method -> words for the paragraph
    regimes: tuple[Regime, ...] = ()

    def label(self, method: str) -> str:
        return self.labels.get(method, method)


@dataclass(frozen=True)
class Difference:
    """Paired difference of two methods' scores over the seeds both have: mean, sample SD (None for one seed)."""

    mean: float
    sd: float | None
    seeds: int


@dataclass(frozen=True)
class Advice:
    """What the rule found: the regime, the two methods compared, whether the benchmark can tell, the words."""

    regime: Regime
    leader: str
    runner_up: str
    difference: Difference
    trend: float  # the largest change of the difference between this regime and another
    spread: float | None  # the largest SD of the difference over the regimes (None: no regime has two seeds)
    told: bool
    text: str


def figures_from_dict(data: Mapping[str, Any]) -> Figures:
    """Figures from the JSON object `shift_regimes.json` holds."""
    if not data.get("measured"):
        return Figures(measured=False, note=str(data.get("note", "")))
    regimes = tuple(
        Regime(float(r["strength"]), float(r["mean_shift"]), tuple(int(s) for s in r["seeds"]),
               {m: tuple(float(v) for v in values) for m, values in r["scores"].items()})
        for r in data["regimes"])
    return Figures(measured=True, note=str(data.get("note", "")), commit=data.get("commit"),
                   kind=str(data.get("kind", "")), statistics=tuple(data.get("statistics", ())), metric=str(data.get("metric", "macro_f1")),
                   protocol=str(data.get("protocol", "fine-tuned")), labels=dict(data.get("labels", {})),
                   regimes=tuple(sorted(regimes, key=lambda r: r.mean_shift)))


def shipped_figures() -> Figures:
    """The figures this medfl ships (package data)."""
    text = files("medfl.data").joinpath(FIGURES_FILE).read_text(encoding="utf-8")
    return figures_from_dict(json.loads(text))


def paired_difference(regime: Regime, first: str, second: str) -> Difference:
    """first - second, seed by seed."""
    pairs = [a - b for a, b in zip(regime.scores[first], regime.scores[second], strict=True)
             if not (math.isnan(a) or math.isnan(b))]
    if not pairs:
        return Difference(math.nan, None, 0)
    return Difference(statistics.fmean(pairs), statistics.stdev(pairs) if len(pairs) > 1 else None, len(pairs))


def regime_of(figures: Figures, mean_shift: float) -> Regime:
    """The regime whose measured mean shift is nearest to `mean_shift` (the lower one on a tie)."""
    return min(figures.regimes, key=lambda r: (abs(r.mean_shift - mean_shift), r.mean_shift))


def _ranked(regime: Regime) -> list[str]:
    def mean(method: str) -> float:
        values = [v for v in regime.scores[method] if not math.isnan(v)]
        return statistics.fmean(values) if values else -math.inf

    return sorted(regime.scores, key=lambda m: (-mean(m), m))


def advice(figures: Figures, mean_shift: float) -> Advice:
    """The rule (module docstring) for a federation whose mean site shift is `mean_shift`; `figures` measured,
    with at least one regime of two methods."""
    if not figures.measured or not figures.regimes:
        raise ValueError("advice needs measured figures with at least one regime")
    regime = regime_of(figures, mean_shift)
    ranked = _ranked(regime)
    if len(ranked) < 2:
        raise ValueError("advice needs at least two methods in a regime")
    leader, runner_up = ranked[:2]
    here = paired_difference(regime, leader, runner_up)
    others = [paired_difference(r, leader, runner_up) for r in figures.regimes
              if r is not regime and leader in r.scores and runner_up in r.scores]
    trend = max((abs(here.mean - d.mean) for d in others if d.seeds), default=0.0)
    sds = [d.sd for d in (here, *others) if d.sd is not None]
    spread = max(sds) if sds else None
    told = spread is not None and trend > spread
    where = (f"This federation's mean site shift ({mean_shift:.2f}) is nearest the sweep's strength "
             f"{regime.strength:g} (measured {regime.mean_shift:.2f}).")
    lowest, highest = min(r.mean_shift for r in figures.regimes), max(r.mean_shift for r in figures.regimes)
    if not lowest <= mean_shift <= highest:  # a real federation can differ more or less than any swept one
        side = "below" if mean_shift < lowest else "above"
        where += (f" It lies {side} the range the sweep measured ({lowest:.2f}-{highest:.2f}): what follows is "
                  "the nearest measurement, not a measurement at this shift.")
    lead = (f"{figures.label(leader)} led {figures.label(runner_up)} by {_signed(here)}" if here.mean != 0 else
            f"{figures.label(leader)} and {figures.label(runner_up)} tied ({_signed(here)})")
    measure = f"test {METRIC_WORDS.get(figures.metric, figures.metric)}, {figures.protocol} protocol"
    if told:
        text = (f"{where} At this shift, on synthetic federations, {lead} ({measure}, {here.seeds} seed(s)); "
                f"this lead changes with the shift by up to {trend:.3f}, more than the seeds' spread "
                f"({spread:.3f}).")
    else:
        reason = (f"its lead changes across shifts by at most {trend:.3f}, within the seeds' spread ({spread:.3f})"
                  if spread is not None else "no regime has two seeds to measure a spread")
        text = (f"{where} The benchmark could not tell which method this shift favours: there {lead} ({measure}), "
                f"but {reason}.")
    return Advice(regime, leader, runner_up, here, trend, spread, told, text)


def _signed(difference: Difference) -> str:
    spread = f" ± {difference.sd:.3f}" if difference.sd is not None else " (one seed)"
    return f"{difference.mean:.3f}{spread}"


def check_advice(figures: Figures, kind: str, compared: Sequence[str], mean_shift: float | None, sites: int) -> str:
    """The paragraph (or the one line saying why there is none) `medfl check` prints after a shift table of
    `sites` sites measured with the statistics `kind` (a StatisticSet's title) and `compared`."""
    if sites < 2:
        return ("no advice on which method fits: one site has no site shift to measure (check two or more sites "
                "together)")
    if not figures.measured:
        return ("no advice on which method fits: this medfl ships no measurement of the shift sweep yet "
                f"({FIGURES_FILE}: {figures.note})" if figures.note else
                "no advice on which method fits: this medfl ships no measurement of the shift sweep yet")
    if (kind, tuple(compared)) != (figures.kind, figures.statistics):
        measured = figures.kind or "other statistics"
        return (f"no advice on which method fits: the shift sweep measured {measured} ({', '.join(figures.statistics)}), "
                f"not {kind} ({', '.join(compared)})")
    if mean_shift is None or math.isnan(mean_shift):
        return "no advice on which method fits: the sites' mean shift could not be measured"
    return advice(figures, mean_shift).text
