"""What a run says about itself: the sites' reports gathered, and the summary computed from them.

The run folder (medfl.runfolder) rewrites metrics.csv, det_states.csv, retrogress.csv, timing.csv and
summary.json atomically from this log after every round, so a run folder is always consistent with its last
completed round, and a resumed run continues it row for row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from medfl.metrics import curve_dips, reference_window_start


def _value(rows: Iterable[Mapping[str, Any]], **match: Any) -> float:
    for row in rows:
        if all(row[k] == v for k, v in match.items()):
            return float(row["value"])
    return math.nan


def used_curve(rows: Sequence[Mapping[str, Any]], site: str, model: str, metric: str) -> list[float]:
    """The validation metric of ``model`` after communication and after every epoch, in time order."""
    points = sorted(
        (row["round"], row["epoch"], float(row["value"]))
        for row in rows
        if row["site"] == site and row["model"] == model and row["split"] == "val" and row["metric"] == metric
    )
    return [value for _, _, value in points]


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarize(
    rows: Sequence[Mapping[str, Any]],
    retrogress_rows: Sequence[Mapping[str, Any]],
    best: Mapping[str, Mapping[str, Any]],
    used_model: str,
    metric: str,
    last_round: int,
    final_epoch: int,
    det_rows: Sequence[Mapping[str, Any]] = (),
    rounds: int | None = None,
) -> dict[str, Any]:
    """Per-site and mean results under both scoring protocols, retrogress/recovery of the receiving model
    (also after BatchNorm re-estimation, when measured), curve dips and DET state changes.

    Per-site fine-tuned protocol (``test``): the used model after local training, at the round its own
    validation score selected. Reference protocol (``reference_protocol``): see `reference_protocol`, over
    the selection window of `rounds` planned rounds (default: the rounds completed so far).
    """
    test_metrics = sorted({row["metric"] for row in rows if row["split"] == "test"})
    sites: dict[str, Any] = {}
    for site, choice in best.items():
        selected = choice["round"]
        site_rows = [r for r in rows if r["site"] == site and r["model"] == used_model and r["epoch"] == final_epoch]
        retro = [r for r in retrogress_rows if r["site"] == site]
        sites[site] = {
            "selected_round": selected,
            "val_" + metric: choice["value"],
            "test": {m: _value(site_rows, round=selected, split="test", metric=m) for m in test_metrics},
            "test_last_round": {m: _value(site_rows, round=last_round, split="test", metric=m) for m in test_metrics},
            "retrogress": _mean(r.get("retrogress", math.nan) for r in retro),
            "recovery": _mean(r.get("recovery", math.nan) for r in retro),
            "retrogress_bn_reestimated": _mean(r.get("retrogress_bn_reestimated", math.nan) for r in retro),
            "curve_dips": curve_dips(used_curve(rows, site, used_model, metric)),
            **det_state_changes([r for r in det_rows if r["site"] == site]),
        }
    mean = {
        "test": {m: _mean(s["test"][m] for s in sites.values()) for m in test_metrics},
        "test_last_round": {m: _mean(s["test_last_round"][m] for s in sites.values()) for m in test_metrics},
        **{key: _mean(s[key] for s in sites.values())
           for key in ("retrogress", "recovery", "retrogress_bn_reestimated", "curve_dips",
                       "det_changes_per_round", "det_fallbacks_per_round")},
    }
    return {"sites": sites, "mean": mean,
            "reference_protocol": reference_protocol(rows, list(best), used_model, metric, test_metrics,
                                                     rounds if rounds is not None else last_round + 1)}


def reference_protocol(
    rows: Sequence[Mapping[str, Any]], sites: Sequence[str], used_model: str, metric: str, test_metrics: Sequence[str],
    rounds: int,
) -> dict[str, Any]:
    """The reference code's scoring: the model each site would use right after communication (epoch 0 of a
    round: the received model for FedAvg/FedBN, P for the method, its own model for local training), one
    round for all sites, chosen by the mean over sites of that model's validation score among the rounds of
    the selection window (rounds >= 0.8 T, where the sites also scored it on test)."""
    at_start = [r for r in rows if r["model"] == used_model and r["epoch"] == 0 and r["site"] in sites]
    scored = {r["round"] for r in at_start if r["split"] == "test"}
    window = [t for t in range(reference_window_start(rounds), rounds) if t in scored]
    means = {t: _mean(_value(at_start, site=s, round=t, split="val", metric=metric) for s in sites) for t in window}
    candidates = [t for t in window if not math.isnan(means[t])]
    if not candidates:
        return {"window": window, "selected_round": None, "val_mean": math.nan, "sites": {}, "mean": {}}
    selected = max(candidates, key=lambda t: (means[t], -t))  # the earliest of equal means
    per_site = {s: {"test": {m: _value(at_start, site=s, round=selected, split="test", metric=m)
                             for m in test_metrics}} for s in sites}
    return {
        "window": window,
        "selected_round": selected,
        "val_mean": means[selected],
        "sites": per_site,
        "mean": {"test": {m: _mean(p["test"][m] for p in per_site.values()) for m in test_metrics}},
    }


_STATE_ORDER = {"recover": 0, "exchange": 1, "sublimate": 2}


def det_state_changes(det_rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """How often DET's state changes from one local epoch to the next within a round (the first epoch is
    always Recover, so only later epochs count), and how often it falls back to an earlier state, per round.
    Frequent fallbacks mean that phi is too noisy to steer DET."""
    by_round: dict[int, list[str]] = {}
    for row in sorted(det_rows, key=lambda r: (r["round"], r["epoch"])):
        if row.get("state"):
            by_round.setdefault(row["round"], []).append(str(row["state"]).lower())
    if not by_round:
        return {"det_changes_per_round": math.nan, "det_fallbacks_per_round": math.nan}
    changes = fallbacks = 0
    for states in by_round.values():
        for before, after in pairwise(states):
            changes += before != after
            fallbacks += _STATE_ORDER.get(after, 0) < _STATE_ORDER.get(before, 0)
    return {"det_changes_per_round": changes / len(by_round), "det_fallbacks_per_round": fallbacks / len(by_round)}


class RunLog:
    """What the sites reported through ``evaluate``: metric rows, DET states, retrogress, selected rounds.

    The coordinator (in process or on NVFlare) only ever sees these reports, never a site's internals;
    the log is part of the server checkpoint so that a resumed run continues it.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.det: list[dict[str, Any]] = []
        self.retrogress: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}

    def add(self, site: str, report: Mapping[str, Any]) -> None:
        """Add one site's evaluate() metrics: {"rows", "det", "retrogress", "best"}."""
        self.rows.extend(report["rows"])
        self.det.extend(report["det"])
        self.retrogress.extend(report["retrogress"])
        self.best[site] = dict(report["best"])

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "det": self.det, "retrogress": self.retrogress, "best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rows, self.det = list(state["rows"]), list(state["det"])
        self.retrogress, self.best = list(state["retrogress"]), dict(state["best"])

    def summary(self, header: Mapping[str, Any], timing: Sequence[Mapping[str, Any]], used_model: str,
                metric: str, last_round: int, final_epoch: int) -> dict[str, Any]:
        """summary.json's content: the header, both protocols' results and the timing means."""
        return {
            **header,
            **summarize(self.rows, self.retrogress, self.best, used_model, metric, last_round, final_epoch,
                        self.det, header.get("rounds")),
            "timing": _timing_means(timing),
        }

    def ordered_rows(self) -> list[Mapping[str, Any]]:
        return _ordered(self.rows)

    def ordered_det(self) -> list[Mapping[str, Any]]:
        return _ordered(self.det)

    def ordered_retrogress(self) -> list[Mapping[str, Any]]:
        return _ordered(self.retrogress)


def _ordered(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows grouped by site in first-seen order, then by time: the same file whatever the reporting order."""
    sites = list(dict.fromkeys(row["site"] for row in rows))
    return sorted(rows, key=lambda row: (sites.index(row["site"]), row["round"], row.get("epoch", 0)))


def _timing_means(timing: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    keys = ("train_s", "eval_s", "aggregation_s", "round_s")
    means = {f"mean_{k}": sum(t[k] for t in timing) / len(timing) for k in keys} if timing else {}
    means["peak_rss_mb"] = max((t.get("peak_rss_mb", math.nan) for t in timing), default=math.nan)
    return means
