"""What travels in NVFlare's FLModel between the medfl controller and a site, in each direction.

The server's typed payloads (medfl.federated.payloads: a `Delivery` down, a `SiteUpdate` up) travel as
FLModel params (weights, as torch tensors) and a `medfl` entry in FLModel meta (statistics as tensors,
round, flags). Decoding gives back payloads equal to the in-process ones, so a site trains on exactly what it
would have received in process. A site's evaluation report travels as FLModel metrics.

A failing site reports only the error's type: the message (which may name the site's files) stays in the
site's own log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monai.fl.utils.exchange_object import ExchangeObject
from nvflare.app_common.abstract.fl_model import FLModel

from medfl.federated.payloads import Delivery, upload_from_exchange
from medfl.federated.server import SiteUpdate

TASK_DATA_STATS = "data_stats"
TASK_TRAIN = "train"
TASK_RESULTS = "results"  # after the last round: each site's own results, so it can export where it runs
KEY = "medfl"


@dataclass
class TrainTask:
    """A site's task for one round: what the server delivers, the round, and whether to upload after it."""

    delivery: Delivery | None
    round: int
    upload: bool


@dataclass
class Reply:
    """One site's answer to a task, as the controller reads it."""

    site: str
    failed: str | None = None  # the error type when the site could not do the task
    round: int | None = None
    report: dict[str, Any] | None = None  # Site.evaluate() metrics: round, rows, det, retrogress, best, timing
    upload: SiteUpdate | None = None  # Site.get_weights(): deputy weights and statistics
    statistics: dict[str, Any] | None = None  # Site.get_data_stats(): class counts, sample count, network


# ---------------------------------------------------------------- server -> site
def stats_task() -> FLModel:
    """Ask a site to load its data and report its class counts, sample count and network."""
    return FLModel(params={}, meta={KEY: {"task": TASK_DATA_STATS}})


def train_task(delivery: Delivery | None, round_: int, rounds: int, upload: bool) -> FLModel:
    """Round `round_` for one site: its own weights (if any) and the federation's statistics."""
    encoded = None
    if delivery is not None:
        encoded = {"has_weights": delivery.weights is not None, "statistics": delivery.statistics}
    weights = dict(delivery.weights) if delivery is not None and delivery.weights else {}
    return FLModel(params=weights, current_round=round_, total_rounds=rounds,
                   meta={KEY: {"task": TASK_TRAIN, "round": round_, "upload": upload, "delivery": encoded}})


def results_task(results: dict[str, Any]) -> FLModel:
    """The run's results for one site (RunFolder.site_results: its own entries only)."""
    return FLModel(params={}, meta={KEY: {"task": TASK_RESULTS, "results": results}})


def read_results_task(model: FLModel) -> dict[str, Any]:
    return dict(_entry(model)["results"])


def results_reply(written: bool) -> FLModel:
    return FLModel(params={}, meta={KEY: {"statistics": {"written": written}}})


def task_kind(model: FLModel) -> str:
    """Which medfl task a message from the controller is (the payload says it, whatever NVFlare names it);
    "" for a message that is not medfl's."""
    entry = (model.meta or {}).get(KEY)
    return str(entry.get("task", "")) if isinstance(entry, dict) else ""


def read_train_task(model: FLModel) -> TrainTask:
    """The site's view of a train task: the Delivery the in-process server would have passed."""
    entry = _entry(model)
    encoded = entry.get("delivery")
    delivery = None
    if encoded is not None:
        weights = dict(model.params or {}) if encoded["has_weights"] else None
        delivery = Delivery(weights, **encoded["statistics"])
    return TrainTask(delivery=delivery, round=int(entry["round"]), upload=bool(entry["upload"]))


# ---------------------------------------------------------------- site -> server
def stats_reply(statistics: dict[str, Any]) -> FLModel:
    return FLModel(params={}, meta={KEY: {"statistics": dict(statistics)}})


def train_reply(round_: int, report: dict[str, Any], upload: ExchangeObject | None) -> FLModel:
    """The round's evaluation report, and (for methods that communicate) the deputy's weights and statistics."""
    weights = dict(upload.weights or {}) if upload is not None else {}
    statistics = dict(upload.statistics or {}) if upload is not None else None
    return FLModel(params=weights, metrics=dict(report), current_round=round_,
                   meta={KEY: {"round": round_, "upload": statistics}})


def failure_reply(round_: int | None, error_type: str) -> FLModel:
    return FLModel(params={}, meta={KEY: {"round": round_, "failed": error_type}})


def read_reply(model: FLModel) -> Reply:
    """Decode a site's reply; the site's name is the one NVFlare authenticated, not one the site wrote."""
    entry = _entry(model)
    reply = Reply(site=str(model.meta["client_name"]), failed=entry.get("failed"), round=entry.get("round"),
                  statistics=entry.get("statistics"))
    if model.metrics is not None:
        reply.report = dict(model.metrics)
    if entry.get("upload") is not None:
        reply.upload = upload_from_exchange(ExchangeObject(weights=dict(model.params or {}), statistics=entry["upload"]))
    return reply


def _entry(model: FLModel) -> dict[str, Any]:
    entry = (model.meta or {}).get(KEY)
    if not isinstance(entry, dict):
        raise ValueError(f"not a medfl message: FLModel meta has no '{KEY}' entry")
    return entry
