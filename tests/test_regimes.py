"""The shift sweep's figures and the rule that turns them into `medfl check`'s advice (medfl.data.regimes), on
hand-made figure tables."""

from __future__ import annotations

import json
import re
from importlib.resources import files

import pytest

from medfl.data.regimes import (
    FIGURES_FILE,
    Figures,
    Regime,
    advice,
    check_advice,
    figures_from_dict,
    paired_difference,
    regime_of,
    shipped_figures,
)
from medfl.data.shift import DERMOSCOPY, PROSTATE

LABELS = {"prr": "prr", "fedavg": "FedAvg with fine-tuning", "local": "local training"}


def _figures(*regimes: tuple[float, float, dict[str, list[float]]]) -> Figures:
    """Regimes (strength, measured mean shift, method -> score per seed, seeds 0, 1, ...)."""
    return Figures(measured=True, commit="0" * 40, kind=DERMOSCOPY.title, statistics=DERMOSCOPY.compared,
                   labels=LABELS, regimes=tuple(Regime(s, m, tuple(range(len(next(iter(v.values()))))), v)
                                                for s, m, v in regimes))


# prr's lead over FedAvg-FT grows with the shift by far more than the seeds' spread (0.01).
GROWING = _figures((0.5, 1.4, {"prr": [0.70, 0.72], "fedavg": [0.72, 0.73], "local": [0.60, 0.61]}),
                   (1.0, 1.8, {"prr": [0.68], "fedavg": [0.67], "local": [0.62]}),
                   (1.5, 2.3, {"prr": [0.66, 0.67], "fedavg": [0.61, 0.61], "local": [0.60, 0.62]}))
# The same lead of about 0.01 everywhere, with a spread of 0.03 between seeds.
FLAT = _figures((0.5, 1.4, {"prr": [0.70, 0.74], "fedavg": [0.71, 0.71]}),
                (1.5, 2.3, {"prr": [0.66, 0.69], "fedavg": [0.66, 0.67]}))


def test_a_federation_falls_in_the_regime_with_the_nearest_measured_shift() -> None:
    assert [regime_of(GROWING, shift).strength for shift in (0.0, 1.59, 1.61, 2.0, 2.1, 9.0)] == \
           [0.5, 0.5, 1.0, 1.0, 1.5, 1.5]


def test_paired_differences_are_taken_seed_by_seed() -> None:
    difference = paired_difference(GROWING.regimes[2], "prr", "fedavg")
    assert difference.mean == pytest.approx(0.055) and difference.sd == pytest.approx(0.00707, abs=1e-5)
    assert paired_difference(GROWING.regimes[1], "prr", "fedavg").sd is None  # one seed


def test_a_trend_larger_than_the_seeds_spread_gives_advice() -> None:
    found = advice(GROWING, 2.35)
    assert found.told and (found.leader, found.runner_up) == ("prr", "fedavg")
    assert found.difference.mean == pytest.approx(0.055) and found.trend == pytest.approx(0.07)
    assert found.spread == pytest.approx(0.00707, abs=1e-5)
    assert "At this shift, on synthetic federations, prr led FedAvg with fine-tuning by 0.055 ± 0.007" in found.text
    assert "nearest the sweep's strength 1.5 (measured 2.30)" in found.text and "could not tell" not in found.text
    assert "It lies above the range the sweep measured (1.40-2.30)" in found.text
    assert "the range the sweep measured" not in advice(GROWING, 2.0).text
    mild = advice(GROWING, 1.3)  # at the small shift FedAvg-FT led, and the benchmark can say so too
    assert "It lies below the range the sweep measured (1.40-2.30)" in mild.text
    assert mild.told and (mild.leader, mild.runner_up) == ("fedavg", "prr")
    assert "FedAvg with fine-tuning led prr by 0.015 ± 0.007" in mild.text


def test_a_trend_within_the_seeds_spread_says_the_benchmark_could_not_tell() -> None:
    found = advice(FLAT, 2.3)
    assert not found.told and found.trend < found.spread
    assert "The benchmark could not tell which method this shift favours" in found.text
    assert "within the seeds' spread" in found.text
    one_seed = _figures((0.5, 1.4, {"prr": [0.7], "fedavg": [0.6]}), (1.5, 2.3, {"prr": [0.6], "fedavg": [0.7]}))
    found = advice(one_seed, 1.4)
    assert not found.told and found.spread is None and "no regime has two seeds" in found.text


def test_check_gives_one_line_where_it_gives_no_advice() -> None:
    unmeasured = Figures(measured=False, note="not yet")
    for line in (check_advice(GROWING, DERMOSCOPY.title, DERMOSCOPY.compared, None, 1),
                 check_advice(unmeasured, DERMOSCOPY.title, DERMOSCOPY.compared, 2.0, 3),
                 check_advice(GROWING, PROSTATE.title, PROSTATE.compared, 0.8, 6),
                 check_advice(GROWING, DERMOSCOPY.title, DERMOSCOPY.compared, float("nan"), 2)):
        assert line.startswith("no advice on which method fits: ") and "\n" not in line
    assert "one site has no site shift" in check_advice(GROWING, DERMOSCOPY.title, DERMOSCOPY.compared, None, 1)
    assert "ships no measurement" in check_advice(unmeasured, DERMOSCOPY.title, DERMOSCOPY.compared, 2.0, 3)
    assert "measured colour and content per image" in check_advice(GROWING, PROSTATE.title, PROSTATE.compared, 1, 6)
    assert check_advice(GROWING, DERMOSCOPY.title, DERMOSCOPY.compared, 2.35, 4) == advice(GROWING, 2.35).text


def test_the_shipped_figures_carry_their_commit_or_say_that_nothing_was_measured() -> None:
    data = json.loads(files("medfl.data").joinpath(FIGURES_FILE).read_text(encoding="utf-8"))
    figures = shipped_figures()
    assert figures == figures_from_dict(data)
    if not figures.measured:
        assert figures.regimes == () and data["regimes"] == [] and figures.note
        return
    assert re.fullmatch(r"[0-9a-f]{40}", figures.commit or ""), "the figures name the commit they came from"
    assert (figures.kind, figures.statistics) == (DERMOSCOPY.title, DERMOSCOPY.compared), "measured by this meter"
    assert len(figures.regimes) >= 2 and all(len(r.scores) >= 2 for r in figures.regimes)
