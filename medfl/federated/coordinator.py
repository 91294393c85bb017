"""The in-process coordinator: a thin, sequential round loop over named sites.

Each round: every site trains (receiving its own weights from the last aggregation), is evaluated, and
uploads; the engine-free strategy aggregates; each site's state and the server's state are checkpointed
atomically; the run's CSVs and summary are rewritten. ``--resume`` continues after the last completed round.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.fl.utils.exchange_object import ExchangeObject

from medfl.checkpoints import atomic_torch_save, atomic_write_text
from medfl.errors import ConfigError, DataError, MedflError
from medfl.experiment import ExperimentConfig
from medfl.federated.server import Aggregate, SiteUpdate, Strategy, build_strategy
from medfl.federated.site import Site
from medfl.metrics import task_metric_name
from medfl.report.tensorboard import write_round_scalars
from medfl.runlog import RunLog

CHECKPOINTS = "checkpoints"


def resolve_device(choice: str) -> torch.device:
    """"auto": CUDA when present, else CPU; "cuda" without a GPU is a config error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available (use 'auto' or 'cpu')")
    return torch.device(choice)


def strategy_options(config: ExperimentConfig) -> dict[str, Any]:
    """The strategy's keyword settings from the experiment config."""
    aggregation = config.spec.aggregation
    options: dict[str, Any] = {"prototype_mode": config.cpa.prototype_mode, "seed": config.seed}
    if aggregation == "pfa":
        options.update(start=config.pfa.start, end=config.pfa.end, share_phase=config.pfa.share_phase,
                       weighting=config.pfa.weighting)
    elif aggregation in ("fedavg", "fedbn", "silobn", "fedper"):
        options["weighting"] = config.baselines.fedavg_weighting
    return options


def site_update(exchange: ExchangeObject, device: torch.device) -> SiteUpdate:
    """Turn a site's upload into the strategy's input, its weights on the aggregation device."""
    stats = exchange.statistics or {}
    return SiteUpdate(
        weights={key: value.to(device) for key, value in (exchange.weights or {}).items()},
        num_samples=int(stats["num_samples"]),
        class_counts=stats.get("class_counts"),
        prototypes=stats.get("prototypes"),
        prototype_counts=stats.get("prototype_counts"),
    )


def delivery(aggregate: Aggregate, site: str) -> ExchangeObject:
    """What the server sends one site: its own weights plus the federation's counts and prototypes."""
    return ExchangeObject(
        weights=aggregate.weights.get(site) or None,
        statistics={
            "global_class_counts": aggregate.global_class_counts,
            "global_prototypes": aggregate.global_prototypes,
            "global_prototype_present": aggregate.global_prototype_present,
        },
    )


def aggregate_and_deliver(strategy: Strategy, round_: int, updates: dict[str, SiteUpdate],
                          sites: list[str]) -> tuple[dict[str, ExchangeObject | None], float]:
    """One server step, shared by the in-process coordinator and the NVFlare controller: what each site
    receives next (None for all when no site uploaded) and the seconds spent aggregating."""
    if not updates:
        return dict.fromkeys(sites), 0.0
    tick = time.perf_counter()
    aggregate = strategy.aggregate(round_, updates)
    seconds = time.perf_counter() - tick
    return {site: delivery(aggregate, site) for site in sites}, seconds


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ru_maxrss survives exec (a child started from a large
    parent reports the parent's peak), so /proc's VmHWM is read where it exists."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    usage = {"peak_rss_mb": _peak_rss_mb()}
    if device.type == "cuda":
        usage["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return usage


class Coordinator:
    """Runs an experiment's rounds over its sites and writes everything into one run folder."""

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: str | Path,
        device: torch.device | None = None,
        progress: Callable[[str, dict[str, Any]], None] | None = None,
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = device or resolve_device(config.device)
        self.progress = progress or (lambda event, info: None)
        self.sites: dict[str, Site] = {}
        self.strategy: Strategy | None = None
        self.deliveries: dict[str, ExchangeObject | None] = {}
        self.timing: list[dict[str, Any]] = []
        self.log = RunLog()

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Check every site's data (all problems reported together) and build sites and the strategy."""
        site_configs = self.config.load_sites()
        problems: list[str] = []
        for site_config in site_configs:
            site = Site(site_config, self.config, self.run_dir, self.device)
            site.on_epoch = lambda info: self.progress("epoch", info)
            try:
                site.initialize()
            except DataError as error:
                problems.append(str(error))
                continue
            self.sites[site.name] = site
        if problems:
            raise DataError("\n".join(problems))
        first = next(iter(self.sites.values()))
        self.strategy = build_strategy(
            self.config.method, first.models[first.receiving_name], self.config.rounds, **strategy_options(self.config)
        )
        counts = [site.get_data_stats().statistics["class_counts"] for site in self.sites.values()]
        global_counts = torch.stack(counts).sum(0)
        first_delivery = ExchangeObject(statistics={"global_class_counts": global_counts})
        self.deliveries = {name: first_delivery for name in self.sites}

    def prepare_run_dir(self, resume: bool) -> int:
        """Create the run folder, or find the round to resume from; never overwrite an earlier run."""
        last = self.last_completed_round()
        if resume:
            if last is None:
                raise MedflError(f"nothing to resume in {self.run_dir}: no completed round was checkpointed")
            self._check_same_config()
            return last + 1
        if last is not None or (self.run_dir / "summary.json").exists():
            raise MedflError(
                f"{self.run_dir} already holds a run; use --resume to continue it or --out for a new folder"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.run_dir / "config.yaml", yaml.safe_dump(self.config.resolved(), sort_keys=False)
        )
        return 0

    def _check_same_config(self) -> None:
        """A resumed run must use the config it started with; only the number of rounds may grow."""
        saved = yaml.safe_load((self.run_dir / "config.yaml").read_text(encoding="utf-8"))
        current = self.config.resolved()
        changed = sorted(k for k in set(saved) | set(current) if k != "rounds" and saved.get(k) != current.get(k))
        if changed:
            raise ConfigError(
                f"cannot resume {self.run_dir}: the config differs from the one it started with in {', '.join(changed)}"
            )
        if current["rounds"] != saved["rounds"]:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(current, sort_keys=False))

    def last_completed_round(self) -> int | None:
        pointer = self.run_dir / CHECKPOINTS / "last.pt"
        if not pointer.is_file():
            return None
        return int(torch.load(pointer, map_location="cpu", weights_only=False)["round"])

    def restore(self, round_: int) -> None:
        """Load the server checkpoint of ``round_`` and every site's state of the same round."""
        state = torch.load(self.run_dir / CHECKPOINTS / "last.pt", map_location="cpu", weights_only=False)
        if state["round"] != round_:
            raise MedflError(f"checkpoint round {state['round']} does not match {round_}")
        if self.strategy is not None and state["strategy"] is not None:
            self.strategy.load_state_dict(state["strategy"])
        self.deliveries = {
            name: ExchangeObject(weights=d["weights"], statistics=d["statistics"]) if d else None
            for name, d in state["deliveries"].items()
        }
        self.timing = state["timing"]
        self.log.load_state_dict(state["log"])
        for site in self.sites.values():
            site.load_state(round_)

    # ------------------------------------------------------------------ rounds
    def run(self, resume: bool = False) -> dict[str, Any]:
        start = self.prepare_run_dir(resume)
        self.setup()
        if resume:
            self.restore(start - 1)
        self.progress("start", {"rounds": self.config.rounds, "start": start, "sites": list(self.sites),
                                "epochs": self.config.local_epochs})
        summary: dict[str, Any] = {}
        for round_ in range(start, self.config.rounds):
            summary = self.run_round(round_)
        self.progress("end", {"summary": summary})
        for site in self.sites.values():
            site.finalize()
        return summary

    def run_round(self, round_: int) -> dict[str, Any]:
        timing = {"round": round_, "train_s": 0.0, "eval_s": 0.0, "aggregation_s": 0.0}
        started = time.perf_counter()
        for name, site in self.sites.items():
            self.progress("site", {"round": round_, "site": name})
            eval_before = site.eval_seconds
            tick = time.perf_counter()
            site.train(self.deliveries.get(name), {"round": round_})
            inner_eval = site.eval_seconds - eval_before
            timing["train_s"] += time.perf_counter() - tick - inner_eval
            tick = time.perf_counter()
            self.log.add(name, site.evaluate().metrics)
            timing["eval_s"] += time.perf_counter() - tick + inner_eval
            if self.config.runtime.offload_idle_sites and self.device.type == "cuda":
                site.offload()
        if self.strategy is not None and round_ < self.config.rounds - 1:
            updates = {name: site_update(site.get_weights(), self.device) for name, site in self.sites.items()}
            self.deliveries, timing["aggregation_s"] = aggregate_and_deliver(
                self.strategy, round_, updates, list(self.sites))
        else:
            self.deliveries = {name: None for name in self.sites}
        timing["round_s"] = time.perf_counter() - started
        timing.update(peak_memory_mb(self.device))
        self.timing.append(timing)
        for site in self.sites.values():
            site.save_state()
        self.checkpoint(round_)
        summary = self.write_outputs(round_)
        self.progress("round", {"round": round_, "timing": timing, "summary": summary})
        return summary

    def checkpoint(self, round_: int) -> None:
        """The server's state after ``round_``; written last, so it marks the round as completed."""
        state = {
            "round": round_,
            "strategy": self.strategy.state_dict() if self.strategy is not None else None,
            "deliveries": {
                name: {"weights": d.weights, "statistics": d.statistics} if d is not None else None
                for name, d in self.deliveries.items()
            },
            "timing": self.timing,
            "log": self.log.state_dict(),
        }
        atomic_torch_save(state, self.run_dir / CHECKPOINTS / "last.pt")

    def write_outputs(self, round_: int) -> dict[str, Any]:
        header = {
            "experiment": self.config.name,
            "method": self.config.method,
            "task": self.config.task,
            "metric": task_metric_name(self.config.task),
            "completed_rounds": round_ + 1,
            "rounds": self.config.rounds,
            "finished": round_ + 1 == self.config.rounds,
            "device": str(self.device),
        }
        used = "P" if self.config.spec.two_models else "M"
        summary = self.log.write(self.run_dir, header, self.timing, used, header["metric"], round_,
                                 self.config.local_epochs)
        write_round_scalars(self.run_dir, round_, self.config.local_epochs, self.log.rows, self.log.det,
                            self.log.retrogress, self.timing)
        return summary


def run_directory(config: ExperimentConfig, out: str | Path | None) -> Path:
    """--out when given, else <output_dir>/<name>-<method>-seed<seed>/, so that methods and seeds sit side by side."""
    if out is not None:
        return Path(out)
    return Path(config.output_dir) / f"{config.name}-{config.method}-seed{config.seed}"
