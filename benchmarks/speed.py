"""Speed and scale of medfl, side by side in one run: aggregation, DET epochs, data loading, K sites, bytes.

1. Aggregation: FedAvg, medfl's PFA and the reference-style PFA of `aggregation.py` on three full-width
   networks (K = 4), methods taking turns; medfl's PFA must equal the reference-style one within 1e-5.
2. Epochs: a DET epoch (P and D step on every batch, state Exchange, then the two validation passes that DET
   needs) against a single-model epoch with the same loss (pfa_only) on the same site, data and network, and
   against FedAvg's cross-entropy epoch, with `medfl.federated.training.train_epoch` and `evaluate_model`,
   taking turns. Target: DET at most 2.2x.
3. Data loading: inside those epochs, the time the training loop spends waiting for the next batch of the
   cached dataset (the random transform tail and collation) with the loader the Site uses (a ThreadDataLoader
   preparing batches ahead in one thread). Target: at most 10% of the epoch. For comparison, the
   single-model epoch again with inline loading (a DataLoader without workers) and with one worker process,
   and the CPU cost per image of the random tail.
4. Scale: the Coordinator runs prr for 3 rounds of 1 epoch with K = 2, 4, 8, 16 dermoscopy sites, each K in
   a fresh process: round time, aggregation share of a round (target: at most 1%), peak memory (growth
   linear or better) and bytes exchanged per round (uploads from the sites' audit.jsonl, downloads from
   what the coordinator delivers).
5. Sites side by side (`--parallel-sites`, its own invocation): the same prr round at K = 2, 4 and 8 dermoscopy
   sites, one after another in one process against K worker processes (medfl.federated.parallel) with the
   same threads per site, each run in a fresh process: the round's wall time, the slowest site's own
   training time and their ratio (target where the cores are at least K: at most 1.25), the whole run's wall
   time, a worker's start-up (importing torch and MONAI in a fresh process), the CPU time of every process and
   peak memory; then the demo experiments (`make demo`'s) as shipped and with `parallel_sites: auto`, their
   wall and CPU time. Run it on an otherwise idle machine.

    python benchmarks/speed.py [--device auto|cpu|cuda] [--threads 1] [--repeats 3]
    python benchmarks/speed.py --parallel-sites [--sites 2 4 8]   # section 5 only: <output>.parallel.{json,md}
    python benchmarks/speed.py --det-profile [--repeats 3]   # section 6 only: <output>.det.{json,md}
    python benchmarks/speed.py --smoke    # every section (evaluation share, sites side by side too) on tiny data

6. DET's cost by phase (`--det-profile`, its own invocation): at the reference's 128 px and full width, a DET
   step against a single-model step on the same batches, by phase (forward, losses, backward, optimizer step):
   Exchange with one backward over both losses (as medfl trains) and with one backward per model, Sublimate
   (one-way) jointly and teacher first (one model's graph alive at a time); and each op's self CPU time from
   torch's profiler: where DET's cost beyond two model passes goes.

7. 3-D prostate (last in the main run, in each device's `volumetric`): quality.py's --threed 3-D experiment on
   two realistic prostate sites at scale 0.34: the Site's set-up per volume, an epoch of one model and of DET's
   two on patches (per epoch and per batch), the sliding window per validation and test volume, the scoring of a
   compact prediction, and one prr round through the Coordinator: the evaluation share of the sites' time.

`--device auto` measures the CPU and, when a GPU is present, the same again on CUDA, reported separately with
the card's name. Writes benchmarks/results/speed.{json,md,png} (speed.cuda.png for the GPU). Runs and data go
to benchmarks/results/tmp/speed/.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from medfl.checkpoints import atomic_write_json, atomic_write_text
from medfl.synth import Minimums

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from aggregation import (  # noqa: E402 - the sibling benchmark script, found through the line above
    NETWORKS,
    SMOKE_NETWORKS,
    interleaved_times,
    machine,
    max_difference,
    reference_pfa,
    site_states,
)
from quality import SMOKE as QUALITY_SMOKE  # noqa: E402 - the 3-D plans measured in section 7
from quality import THREED_PROSTATE, TaskPlan, experiment_dict, peak_rss_mb  # noqa: E402

RESULTS = BENCHMARKS / "results"
EXPERIMENTS = BENCHMARKS.parent / "site_configs" / "experiments"
TARGETS = {"det_over_single": 2.2, "loading_share": 0.10, "aggregation_share": 0.01, "growth_slope": 1.1,
           "evaluation_share": 0.10, "round_over_slowest_site": 1.25}
# Epoch comparisons: (site folder, shipped experiment, site, overrides of the experiment, loader variants too).
EPOCH_CASES = {
    "dermoscopy": ("dermoscopy", "dermoscopy.yaml", "derm_a", {}, True),
    "prostate": ("prostate", "prostate.yaml", "prost_a", {}, True),
    "dermoscopy-128px-x1": ("dermoscopy", "dermoscopy.yaml", "derm_a",
                            {"data": {"input_size": 128}, "model": {"width": 1.0}}, False),
}
NARROW = {"model": {"width": 0.125}}
TINY_MINIMUMS = Minimums(train=1, val=1, test=1, cases=3)  # the fewest images and cases synth allows


@dataclass(frozen=True)
class Plan:
    """What one invocation measures: the benchmark, or --smoke (every section and code path on tiny data)."""

    networks: list[tuple[str, str, int, int, dict[str, Any]]]  # aggregation.py's networks
    aggregation_sites: int
    epoch_cases: dict[str, tuple[str, str, str, dict[str, Any], bool]]
    scale_rounds: int  # prr rounds (of 1 epoch) for each K
    synth: dict[str, Any]  # medfl.synth.generate's arguments besides n_derm (the largest K)
    demo_synth: dict[str, Any] = field(default_factory=dict)  # the demo experiments' data ({}: `medfl synth`'s)
    demo_budget: dict[str, Any] = field(default_factory=dict)  # overrides of the shipped demos ({}: as shipped)
    demo_tasks: tuple[str, ...] = ("dermoscopy", "prostate")  # the demo experiments measured
    volumetric: Volumetric | None = None  # section 7 (None: not measured)
    worker_imports: str = "import torch, monai.data, medfl.federated.site"  # section 5's timed worker start-up


@dataclass(frozen=True)
class Volumetric:
    """Section 7: a 3-D experiment (quality.py's 3-D plan: spacing, patch, network, local epochs) on prostate
    sites, measured on one site (epochs, the sliding window) and as one round of prr on `sites` sites."""

    plan: TaskPlan  # quality.py's plan of the 3-D prostate runs (its overrides and local epochs)
    synth: dict[str, Any] | None  # medfl.synth.generate's arguments of the prostate sites; None: the plan's synth
    sites: int  # sites of the measured round


PLANS = {
    # Section 7 on the realistic prostate sites of the quality benchmark's 3-D plan, fewer cases: every site's
    # scanner (matrix, spacing, slices) is the same at any scale, so the per-volume costs are those of the plan.
    "full": Plan(NETWORKS, 4, EPOCH_CASES, 3, {"scale": 0.1, "n_prostate": 1},
                 volumetric=Volumetric(THREED_PROSTATE, {"scale": 0.34, "n_prostate": 2, "shift": "realistic"}, 2)),
    "smoke": Plan(
        SMOKE_NETWORKS, 2,
        {"dermoscopy": ("dermoscopy", "dermoscopy.yaml", "derm_a", NARROW, True),
         "prostate": ("prostate", "prostate.yaml", "prost_a", {**NARROW, "data": {"input_size": 32}}, True),
         "dermoscopy-no-loader-variants": ("dermoscopy", "dermoscopy.yaml", "derm_a", NARROW, False)},
        2, {"scale": 0.01, "n_prostate": 1, "minimums": TINY_MINIMUMS},
        # the data of sections 1-4 (its two dermoscopy sites; generated once, `synthetic`)
        demo_synth={"scale": 0.01, "n_derm": 2, "n_prostate": 1, "minimums": TINY_MINIMUMS},
        demo_budget={"rounds": 2, "local_epochs": 1, **NARROW, "data": {"input_size": 32}},
        demo_tasks=("dermoscopy",),  # one: the code path is the same for both tasks
        volumetric=Volumetric(QUALITY_SMOKE.tasks["prostate3d"], None, 1),  # the smoke's one tiny prostate site
        # The start-up is timed the same way in a fresh interpreter that imports medfl only (no torch): the
        # workers' modules are imported by the smoke's own runs, side by side included.
        worker_imports="import medfl",
    ),
}  # fmt: skip
SMOKE_SITES = [2]  # the values of K of --smoke (one: the growth with K is then not measured)
SMOKE_PARALLEL_SITES = [2]  # and of its section 5


class Spawner:
    """Runs `function(job)` in a spawned interpreter and returns its result: by default a fresh interpreter for
    every job, so that each job's peak memory and CPU time are its own. `shared` (--smoke): one spawned
    interpreter for every job of the invocation, the same code path (the job and its result pickled, the job's
    imports and work in a spawned process) at one start-up of torch and MONAI rather than one per job; its
    numbers are then not each job's own (peak memory, the fork server's CPU time add up), and are not read."""

    def __init__(self, shared: bool = False):
        self.shared = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) if shared else None

    def __call__(self, function: Callable[[dict[str, Any]], dict[str, Any]], job: dict[str, Any]) -> dict[str, Any]:
        if self.shared is not None:
            return self.shared.submit(function, job).result()
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(function, job).result()

    def close(self) -> None:
        if self.shared is not None:
            self.shared.shutdown()


GENERATED: dict[str, Path] = {}  # medfl.synth.generate's arguments -> the folder this process generated them into


def synthetic(folder: Path, **arguments: Any) -> Path:
    """`medfl.synth.generate(folder, **arguments)`, or the folder of an earlier call in this process with the
    same arguments: --smoke runs every section in one process, and some generate the same data (an invocation
    of the benchmark runs one section, which generates each data set once)."""
    from medfl.synth import generate

    key = repr(sorted(arguments.items()))
    if key not in GENERATED:
        generate(folder, **arguments)
        for other in [other for other, written in GENERATED.items() if written == folder]:
            del GENERATED[other]  # the folder holds the data of this call now
        GENERATED[key] = folder
    return GENERATED[key]


# ---- 1. aggregation ----------------------------------------------------------------------------------------


def aggregation_rows(device: str, sites: int, repeats: int, ratio: float,
                     networks: list[tuple[str, str, int, int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Median wall and CPU time of FedAvg, PFA and the reference-style PFA per network, as aggregation.py."""
    from medfl.federated.averaging import average_states, normalise_site_weights
    from medfl.federated.params import Role
    from medfl.federated.pfa import pfa_aggregate

    rows = []
    for name, task, classes, channels, options in networks:
        states, roles, parameters = site_states(name, task, classes, channels, options, sites, device)
        counts = {site: 100 + 50 * index for index, site in enumerate(states)}
        weights = normalise_site_weights(list(states), counts)
        runs = {
            "fedavg": partial(average_states, states, weights, list(roles)),
            "pfa": partial(pfa_aggregate, states, roles, ratio, counts),
            "reference_pfa": partial(reference_pfa, states, roles, ratio, weights.numpy()),
        }
        wall, cpu, results = interleaved_times(runs, repeats, device)
        median = {method: statistics.median(times) for method, times in wall.items()}
        difference = max_difference(results["pfa"], results["reference_pfa"])
        rows.append({
            "network": name, "parameters": parameters, "sites": sites, "ratio": ratio,
            "fft_entries": sum(r not in (Role.NORM, Role.OTHER) for r in roles.values()),
            "median_s": median, "cpu_median_s": {m: statistics.median(t) for m, t in cpu.items()},
            "reference_over_pfa": median["reference_pfa"] / median["pfa"],
            "pfa_over_fedavg": median["pfa"] / median["fedavg"],
            "max_abs_diff_vs_reference": difference, "equal_within_1e-5": difference <= 1e-5,
        })
        print(f"  aggregation {name}: fedavg {1000 * median['fedavg']:.1f} ms, pfa {1000 * median['pfa']:.1f} ms, "
              f"reference {1000 * median['reference_pfa']:.1f} ms", flush=True)
    return rows


# ---- 2 and 3. epochs and data loading ----------------------------------------------------------------------


class TimedLoader:
    """Wraps a loader and adds up the wall and CPU time spent waiting for each next batch."""

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader
        self.wall = 0.0
        self.cpu = 0.0

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu
            yield batch


def experiment(name: str, shipped: str, method: str, sites: list[str], device: str, threads: int, rounds: int,
               local_epochs: int, run_root: Path, overrides: dict[str, dict[str, Any]] | None = None):
    """A shipped experiment for these sites, method and budget, sections updated by `overrides`."""
    from medfl.experiment import load_experiment_config

    data = yaml.safe_load((EXPERIMENTS / shipped).read_text(encoding="utf-8"))
    for section, values in (overrides or {}).items():
        data[section] = {**data.get(section, {}), **values}
    data.update({"sites": sites, "method": method, "device": device, "rounds": rounds, "local_epochs": local_epochs,
                 "output_dir": str(run_root), "runtime": {"threads": threads}})
    path = run_root / "configs" / f"{name}-{method}-{len(sites)}sites.yaml"
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return load_experiment_config(path)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    synchronise(device)
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    synchronise(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def epoch_comparison(case: str, spec: tuple[str, str, str, dict[str, Any], bool], synth: Path, device: torch.device,
                     threads: int, repeats: int, run_root: Path) -> dict[str, Any]:
    """DET epoch (training + two validation passes) against a single-model epoch on one site, taking turns."""
    from monai.data import DataLoader, ThreadDataLoader

    from medfl.config import load_site_config
    from medfl.federated.det import DetState
    from medfl.federated.evaluation import evaluate_model
    from medfl.federated.site import PREFETCH_BATCHES, Site
    from medfl.federated.training import EpochPlan, train_epoch
    from medfl.tasks import task_for

    folder, shipped, site_name, overrides, loader_variants = spec
    config_path = str(synth / "site_configs" / folder / f"{site_name}.yaml")
    sites = {}
    # The same site, data and network: prr (P and D, CPA), pfa_only (one model, CPA: DET's cost alone) and
    # fedavg (one model, cross-entropy).
    for method in ("prr", "pfa_only", "fedavg"):
        config = experiment(case, shipped, method, [config_path], device.type, threads, 1, 1, run_root, overrides)
        site = Site(load_site_config(config_path), config, run_root / "epochs" / f"{case}-{method}", device,
                    task=task_for(config.task))
        site.initialize()
        sites[method] = site
    batch_size = sites["prr"].experiment.batch_size

    def loaders(site: Site, loading: str) -> tuple[TimedLoader, DataLoader]:
        dataset = site.datasets["train"]
        options = {"batch_size": batch_size, "shuffle": True, "drop_last": len(dataset) % batch_size == 1}
        if loading == "site":
            train = ThreadDataLoader(dataset, buffer_size=PREFETCH_BATCHES, num_workers=0, **options)
        else:
            train = DataLoader(dataset, num_workers=1 if loading == "process" else 0, **options)
        val = DataLoader(site.datasets["val"], batch_size=max(batch_size, 32), shuffle=False, num_workers=0)
        return TimedLoader(train), val

    def validate(site: Site, val: DataLoader, names: tuple[str, ...]) -> None:
        size = site.experiment.data.input_size
        geometry = site.data.geometry

        def spacing(case: str) -> tuple[float, float, float] | None:  # as the site scores HD95
            return geometry[case].slice_volume_spacing(size) if case in geometry else None

        for name in names:
            evaluate_model(site.models[name], val, site.task, site.classes, device, spacing)

    variants = (  # (key, site, DET state, models validated, how batches are loaded)
        ("det", sites["prr"], DetState.EXCHANGE, ("P", "D"), "site"),
        ("single", sites["pfa_only"], None, ("M",), "site"),
        ("single_ce", sites["fedavg"], None, ("M",), "site"),
        ("single_inline", sites["pfa_only"], None, (), "inline"),
        ("single_process", sites["pfa_only"], None, (), "process"),
    )[: 5 if loader_variants else 3]
    measured: dict[str, list[dict[str, float]]] = {key: [] for key, *_ in variants}
    for repeat in range(repeats + 1):  # the first pass warms up (allocator, lazy imports) and is not kept
        for key, site, state, names, loading in variants:
            train, val = loaders(site, loading)
            plan = EpochPlan(state=state)
            train_wall, train_cpu = timed(lambda s=site, t=train, p=plan: train_epoch(
                s.models, s.trainer.optimizers, t, s.trainer.loss, p, s.task, device), device)
            val_wall, val_cpu = timed(lambda s=site, v=val, n=names: validate(s, v, n), device)
            if repeat:
                measured[key].append({"train_s": train_wall, "train_cpu_s": train_cpu, "val_s": val_wall,
                                      "val_cpu_s": val_cpu, "load_s": train.wall, "load_cpu_s": train.cpu})
    median = {key: {field: statistics.median(row[field] for row in rows) for field in rows[0]}
              for key, rows in measured.items()}
    det, single = median["det"], median["single"]
    return {
        "task": case, "site": site_name, "train_samples": len(sites["prr"].datasets["train"]),
        "val_samples": len(sites["prr"].datasets["val"]), "batch_size": batch_size,
        "network": sites["prr"].models["P"].config, "median": median, "repeats": measured,
        "det_over_single": (det["train_s"] + det["val_s"]) / single["train_s"],
        "det_over_single_with_its_validation": (det["train_s"] + det["val_s"]) / (single["train_s"] + single["val_s"]),
        "det_over_single_cpu": (det["train_cpu_s"] + det["val_cpu_s"]) / single["train_cpu_s"],
        "det_over_single_ce": (det["train_s"] + det["val_s"]) / median["single_ce"]["train_s"],
        "loading_share_single": single["load_s"] / single["train_s"],
        "loading_share_det": det["load_s"] / det["train_s"],
        **{f"loading_share_{key}": median[key]["load_s"] / median[key]["train_s"]
           for key in ("single_inline", "single_process") if key in median},
        **{f"{key}_over_single": median[key]["train_s"] / single["train_s"]
           for key in ("single_inline", "single_process") if key in median},
    }


def loading_breakdown(synth: Path, repeats: int) -> dict[str, float]:
    """CPU milliseconds per image of one pass over a cached training split (derm_a, 32 px): the dataset as the
    Site builds it, with CacheDataset's default deep copy of each cached item, and without RandAffined."""
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose

    from medfl.config import load_site_config
    from medfl.data import build_dataset, load_recipe, load_site
    from medfl.experiment import load_experiment_config
    from medfl.federated.training import plain_tensors
    from medfl.tasks import task_for

    config = load_experiment_config(EXPERIMENTS / "dermoscopy.yaml")
    site = load_site(load_site_config(synth / "site_configs" / "dermoscopy" / "derm_a.yaml"), config.data,
                     task=task_for(config.task))
    recipe = load_recipe(config.data.recipe(config.task, "train"), input_size=config.data.input_size)
    records = site.splits["train"]
    datasets = {
        "as the Site builds it": build_dataset(records, recipe),
        "with a deep copy per item (CacheDataset's default)": CacheDataset(records, recipe, progress=False),
        "without RandAffined": build_dataset(
            records, Compose([t for t in recipe.transforms if type(t).__name__ != "RandAffined"])),
    }
    times: dict[str, list[float]] = {name: [] for name in datasets}
    with plain_tensors():
        for repeat in range(repeats + 1):
            for name, dataset in datasets.items():
                cpu = time.process_time()
                for _ in DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=0):
                    pass
                if repeat:
                    times[name].append(time.process_time() - cpu)
    return {name: 1000 * statistics.median(values) / len(records) for name, values in times.items()}


# ---- 4. scale: K sites through the coordinator -------------------------------------------------------------


def tensor_bytes(values: Iterable[Any]) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, Tensor))


def scale_run(job: dict[str, Any]) -> dict[str, Any]:
    """One K in a fresh process: `Coordinator.run` as `medfl run` plays it, observed through its progress events
    (set-up ends at "start"; after each "round" the deliveries of that round's aggregation are measured).
    Peak RSS is this process's."""
    torch.set_num_threads(job["threads"])
    from medfl.experiment import load_experiment_config
    from medfl.federated.coordinator import Coordinator
    from medfl.tasks import task_for

    rss_after_imports = peak_rss_mb()
    device = torch.device(job["device"])
    config = load_experiment_config(job["config"])
    run_dir = Path(job["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    downloads: list[int] = []
    cpu: list[float] = []
    marks = {"wall": time.perf_counter(), "cpu": time.process_time()}
    measured: dict[str, float] = {}

    def observe(event: str, info: dict[str, Any]) -> None:
        if event == "start":
            measured["setup_s"] = time.perf_counter() - marks["wall"]
            measured["rss_after_setup"] = peak_rss_mb()
            marks["cpu"] = time.process_time()
        elif event == "round":
            cpu.append(time.process_time() - marks["cpu"])
            delivered = [d for d in coordinator.deliveries.values() if d is not None]
            downloads.append(sum(tensor_bytes((d.weights or {}).values())
                                 + tensor_bytes((d.statistics or {}).values()) for d in delivered))
            marks["cpu"] = time.process_time()

    coordinator = Coordinator(config, run_dir, device, progress=observe, task=task_for(config.task))
    coordinator.run()
    setup_s, rss_after_setup = measured["setup_s"], measured["rss_after_setup"]
    uploads: dict[int, int] = {}
    for site in coordinator.sites:
        for line in (run_dir / "sites" / site / "audit.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if "bytes" in entry:
                uploads[entry["round"]] = uploads.get(entry["round"], 0) + entry["bytes"]
    aggregating = [t for t in coordinator.timing if t["aggregation_s"] > 0]
    cpu_aggregating = [c for c, t in zip(cpu, coordinator.timing, strict=True) if t["aggregation_s"] > 0]
    return {
        "sites": len(coordinator.sites),
        "train_samples": sum(len(s.datasets["train"]) for s in coordinator.sites.values()),
        "setup_s": setup_s,
        "timing": coordinator.timing,
        "round_s": statistics.fmean(t["round_s"] for t in aggregating),
        "round_cpu_s": statistics.fmean(cpu_aggregating),
        "aggregation_s": statistics.fmean(t["aggregation_s"] for t in aggregating),
        "aggregation_share": statistics.fmean(t["aggregation_s"] / t["round_s"] for t in aggregating),
        "peak_rss_mb": peak_rss_mb(),
        "peak_cuda_mb": max((t.get("peak_cuda_mb", math.nan) for t in coordinator.timing), default=math.nan),
        "rss_after_imports_mb": rss_after_imports,
        "rss_after_setup_mb": rss_after_setup,
        "upload_bytes_per_round": uploads.get(0, 0),
        "download_bytes_per_round": downloads[0] if downloads else 0,
        "upload_bytes_by_round": uploads,
        "download_bytes_by_round": downloads,
    }


def slope(xs: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(x): 1 is linear growth, below 1 better than linear."""
    if len(set(xs)) < 2:
        return math.nan  # one K (a smoke run) has no growth to measure
    x = [math.log(k) for k in xs]
    y = [math.log(v) for v in values]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum((a - mx) ** 2 for a in x)


def scale_rows(synth: Path, ks: list[int], device: torch.device, threads: int, run_root: Path,
               rounds: int, spawn: Spawner) -> dict[str, Any]:
    """Round time, aggregation share, peak memory and bytes per round for every K, each K in its own process."""
    configs = sorted((synth / "site_configs" / "dermoscopy").glob("*.yaml"))
    rows = []
    for k in ks:
        config = experiment("scale", "dermoscopy.yaml", "prr", [str(p) for p in configs[:k]], device.type, threads,
                            rounds, 1, run_root)
        job = {"config": str(config.source_path), "run_dir": str(run_root / "scale" / f"{device.type}-k{k}"),
               "device": str(device), "threads": threads}
        row = spawn(scale_run, job)
        rows.append(row)
        print(f"  K={k}: round {row['round_s']:.1f} s, aggregation {100 * row['aggregation_share']:.2f}%, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB, up {row['upload_bytes_per_round'] / 2**20:.2f} MiB/round",
              flush=True)
    ks_done = [row["sites"] for row in rows]
    growth = {"round_s": slope(ks_done, [r["round_s"] for r in rows]),
              "round_cpu_s": slope(ks_done, [r["round_cpu_s"] for r in rows]),
              "round_s_vs_train_samples": slope([r["train_samples"] for r in rows], [r["round_s"] for r in rows]),
              "peak_rss_mb": slope(ks_done, [r["peak_rss_mb"] for r in rows]),
              "peak_rss_above_imports_mb": slope(ks_done, [r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in rows]),
              }
    if device.type == "cuda":
        growth["peak_cuda_mb"] = slope(ks_done, [r["peak_cuda_mb"] for r in rows])
    return {"rows": rows, "rounds": rounds, "loglog_slope": growth}


# ---- 7. 3-D prostate ----------------------------------------------------------------------------------------


def volumetric_config(name: str, method: str, sites: list[str], plan: TaskPlan, rounds: int, synth: Path,
                      device: str, threads: int, run_root: Path):
    """quality.py's 3-D experiment (its plan's overrides and local epochs) for these sites, method and rounds."""
    from dataclasses import replace

    from medfl.experiment import load_experiment_config

    data = experiment_dict("prostate3d", replace(plan, rounds=rounds), method, 0, synth, threads, device)
    data.update({"sites": sites, "output_dir": str(run_root)})
    path = run_root / "configs" / f"{name}-{method}.yaml"
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return load_experiment_config(path)


def volumetric_section(root: Path, synth: Path, device: torch.device, threads: int, repeats: int,
                       spec: Volumetric) -> dict[str, Any]:
    """A 3-D experiment's costs. On the first site: reading, resampling and caching its volumes (the Site's
    set-up), one local epoch of one model (local) and of DET's two (prr, state Exchange) on patches, and the
    sliding-window scoring of a validation volume (Dice only, as selection scores it) and of a test volume (HD95
    and the original grid too); each `repeats` times after a warm-up. Then one round of prr on `spec.sites`
    sites through the Coordinator: the share of the sites' time spent scoring (their timing.csv) and the
    process CPU time of the set-up and the round."""
    from monai.data import ThreadDataLoader

    from medfl.config import load_site_config
    from medfl.federated.coordinator import Coordinator
    from medfl.federated.det import DetState
    from medfl.federated.evaluation import volume_on_original_grid
    from medfl.federated.site import PREFETCH_BATCHES, Site
    from medfl.federated.training import EpochPlan, train_epoch
    from medfl.metrics import segmentation_case_metrics
    from medfl.runfolder import RunFolder
    from medfl.synth import generate
    from medfl.tasks import task_for

    run_root = root / "volumetric"
    if spec.synth is not None:
        synth = root / "volumetric-synth"
        generate(synth, n_derm=0, **spec.synth)
    configs = sorted(str(path) for path in (synth / "site_configs" / "prostate").glob("*.yaml"))
    sites, setup = {}, {}
    for method in ("local", "prr"):
        config = volumetric_config("volumetric", method, configs[:1], spec.plan, 1, synth, device.type, threads,
                                   run_root)
        site = Site(load_site_config(configs[0]), config, run_root / "sites" / method, device,
                    task=task_for(config.task, config))
        setup[method] = timed(site.initialize, device)
        sites[method] = site
    site = sites["local"]
    batch_size, data = site.experiment.batch_size, site.experiment.data
    volumes = {split: len(site.datasets[split]) for split in ("train", "val", "test")}
    shapes = [tuple(int(n) for n in batch["image"].shape[2:]) for batch in site._eval_batches("val")]
    measured: dict[str, list[dict[str, float]]] = {"local": [], "prr": [], "val": [], "test": []}
    role = next(iter(site.models))
    for repeat in range(repeats + 1):  # the first pass warms up (allocator, caches, lazy imports): not kept
        for method, state in (("local", None), ("prr", DetState.EXCHANGE)):
            s, plan = sites[method], EpochPlan(state=state)
            loader = TimedLoader(ThreadDataLoader(s.datasets["train"], buffer_size=PREFETCH_BATCHES,
                                                  batch_size=batch_size, shuffle=True, num_workers=0))
            wall, cpu = timed(lambda s=s, t=loader, p=plan: train_epoch(
                s.models, s.trainer.optimizers, t, s.trainer.loss, p, s.task, device), device)
            if repeat:
                measured[method].append({"wall_s": wall, "cpu_s": cpu, "load_cpu_s": loader.cpu})
        for split in ("val", "test"):
            site.scores.forget(role)
            wall, cpu = timed(lambda split=split, role=role: site.scores.score(role, split), device)
            if repeat:
                measured[split].append({"wall_s": wall, "cpu_s": cpu})
    median = {key: {name: statistics.median(row[name] for row in rows) for name in rows[0]}
              for key, rows in measured.items()}
    # HD95's cost grows with the predicted surface: the barely trained network above predicts noise, the worst
    # case. A trained model's prediction is compact; the truth itself stands for it here.
    compact = []
    for batch in site._eval_batches("test"):
        cases = batch["case_id"] if isinstance(batch["case_id"], (list, tuple)) else [batch["case_id"]]
        truths = (torch.as_tensor(batch["label"])[:, 0] > 0).to(torch.uint8).numpy()
        for case, truth in zip(cases, truths, strict=True):
            tick = time.process_time()
            segmentation_case_metrics(truth, truth, site._spacing(str(case)))
            mask_file = str(site.task.original_case(site.data, str(case)))
            segmentation_case_metrics(*volume_on_original_grid(truth, mask_file, data.spacing, str(case)))
            compact.append(time.process_time() - tick)
    batches = math.ceil(volumes["train"] / batch_size)
    patches = batch_size * data.patches_per_volume
    result: dict[str, Any] = {
        "site": site.name, "spacing": list(data.spacing), "patch_size": list(data.patch_size),
        "patches_per_volume": data.patches_per_volume, "batch_size": batch_size, "patches_per_batch": patches,
        "width": site.experiment.model.width, "sliding_window": dict(site.task.sliding_window),
        "volumes": volumes, "val_shapes": shapes, "median": median, "repeats": measured,
        "setup_cpu_s_per_volume": setup["local"][1] / sum(volumes.values()),
        "epoch_cpu_s": {m: median[m]["cpu_s"] for m in ("local", "prr")},
        "batch_cpu_s": {m: median[m]["cpu_s"] / batches for m in ("local", "prr")},
        "loading_share": {m: median[m]["load_cpu_s"] / median[m]["cpu_s"] for m in ("local", "prr")},
        "val_cpu_s_per_volume": median["val"]["cpu_s"] / volumes["val"],
        "test_cpu_s_per_volume": median["test"]["cpu_s"] / volumes["test"],
        "compact_scoring_cpu_s_per_volume": statistics.fmean(compact),
    }
    print(f"  3-D epoch on {site.name} ({volumes['train']} volumes, {batches} batches of {patches} patches): "
          f"local {median['local']['cpu_s']:.1f} CPU s, prr {median['prr']['cpu_s']:.1f} CPU s; sliding window "
          f"{result['val_cpu_s_per_volume']:.2f} CPU s per validation volume, "
          f"{result['test_cpu_s_per_volume']:.2f} per test volume", flush=True)
    # One round of prr through the Coordinator, as a run plays it.
    chosen = configs[:spec.sites]
    config = volumetric_config("volumetric-round", "prr", chosen, spec.plan, 1, synth, device.type, threads, run_root)
    run_dir = run_root / "runs" / f"prr-{len(chosen)}sites"
    shutil.rmtree(run_dir, ignore_errors=True)
    marks = {"cpu": time.process_time()}
    cpu: dict[str, float] = {}

    def observe(event: str, info: dict[str, Any]) -> None:
        if event in ("start", "round"):
            cpu["setup_s" if event == "start" else "round_s"] = time.process_time() - marks["cpu"]
            marks["cpu"] = time.process_time()

    Coordinator(config, run_dir, device, progress=observe, task=task_for(config.task, config)).run()
    timing = RunFolder(run_dir).timing()[0]
    train_s, eval_s = float(timing["train_s"]), float(timing["eval_s"])
    result["round"] = {"sites": len(chosen), "method": "prr", "local_epochs": config.local_epochs,
                       "round_s": float(timing["round_s"]), "train_s": train_s, "eval_s": eval_s,
                       "eval_share": eval_s / (train_s + eval_s), "eval_volumes": int(float(timing["eval_samples"])),
                       "setup_cpu_s": cpu["setup_s"], "round_cpu_s": cpu["round_s"],
                       "peak_rss_mb": float(timing["peak_rss_mb"])}
    print(f"  3-D round, prr on {len(chosen)} site(s): evaluation {100 * result['round']['eval_share']:.1f}% of the "
          f"sites' time", flush=True)
    return result


def volumetric_markdown(v: dict[str, Any]) -> str:
    r, median = v["round"], v["median"]
    epochs = r["local_epochs"]
    window = v["sliding_window"]
    shapes = v["val_shapes"]
    lines = [
        f"### 3-D prostate (`data.dims: 3`), site {v['site']}", "",
        f"Volumes resampled to {' x '.join(f'{x:g}' for x in v['spacing'])} mm (validation volumes "
        f"{', '.join(' x '.join(map(str, shape)) for shape in shapes)} voxels), UNet x{v['width']:g}, batches of "
        f"{v['batch_size']} volumes x {v['patches_per_volume']} patches of {' x '.join(map(str, v['patch_size']))}; "
        f"sliding window overlap {window['sw_overlap']:g}, {window['sw_mode']}, {window['sw_batch_size']} windows at "
        f"once. {v['volumes']['train']} / {v['volumes']['val']} / {v['volumes']['test']} training / validation / "
        "test volumes; median of the repeats.", "",
        "| measure | CPU s | wall s |", "|:---|---:|---:|",
        f"| set-up: reading, resampling and caching, per volume | {v['setup_cpu_s_per_volume']:.2f} | |",
    ]
    for method, text in (("local", "one model (local)"), ("prr", "DET, two models (prr, Exchange)")):
        m = median[method]
        lines += [f"| epoch, {text} | {m['cpu_s']:.2f} | {m['wall_s']:.2f} |",
                  f"| of which waiting for batches (cropping, augmenting) | {m['load_cpu_s']:.2f} | |",
                  f"| per batch of {v['patches_per_batch']} patches, {text} | {v['batch_cpu_s'][method]:.2f} | |"]
    lines += [f"| sliding window per validation volume (Dice) | {v['val_cpu_s_per_volume']:.2f} "
              f"| {median['val']['wall_s'] / v['volumes']['val']:.2f} |",
              f"| sliding window per test volume (Dice, HD95, original grid too), the barely trained network "
              f"| {v['test_cpu_s_per_volume']:.2f} | {median['test']['wall_s'] / v['volumes']['test']:.2f} |",
              f"| scoring a test volume's compact prediction (the truth itself: HD95 and the original grid; "
              f"add the sliding window) | {v['compact_scoring_cpu_s_per_volume']:.2f} | |",
              "", "HD95 searches the nearest surface point for every surface point, so scoring costs more the larger "
              "the predicted surface: a barely trained network's noisy prediction is the worst case, a trained one's "
              "compact prediction costs about what the truth itself does.",
              "", f"One round of prr ({epochs} local epoch{'s' if epochs > 1 else ''}, the round is the run's last, so "
              "both models are scored on test, by networks that have trained one round only) on {r['sites']} site(s) through the Coordinator: the sites trained "
              f"{r['train_s']:.1f} s and scored {r['eval_s']:.1f} s ({r['eval_volumes']} volumes), an evaluation "
              f"share of **{100 * r['eval_share']:.1f}%** (target for the 2-D demos: ≤ "
              f"{100 * TARGETS['evaluation_share']:.0f}%); process CPU {r['setup_cpu_s']:.1f} s of set-up and "
              f"{r['round_cpu_s']:.1f} s for the round; peak RSS {r['peak_rss_mb']:.0f} MB."]
    return "\n".join(lines)


# ---- output ----------------------------------------------------------------------------------------------


def verdict(value: float, limit: float) -> str:
    return "yes" if value <= limit else "**no**"


def device_markdown(section: dict[str, Any]) -> str:
    info = section["machine"]
    name = info.get("gpu") or info["cpu"]
    lines = [f"## {section['device'].upper()}: {name}", "",
             f"torch threads {info['torch_threads']}, load average {info.get('load_average_1min')} at the start, "
             f"{info.get('load_average_1min_end')} at the end.", ""]
    epochs = section["epochs"]
    scale = section["scale"]
    shares = [r["aggregation_share"] for r in scale["rows"]]
    aggregation_share = statistics.median(shares)
    lines += ["### Targets", "", "| measure | value | target | met |", "|:---|---:|---:|---:|"]
    for e in epochs:
        lines.append(f"| DET epoch / single-model epoch, {e['task']} | {e['det_over_single']:.2f}x "
                     f"| ≤ {TARGETS['det_over_single']}x | {verdict(e['det_over_single'], TARGETS['det_over_single'])} |")
    for e in epochs:
        share = max(e["loading_share_single"], e["loading_share_det"])
        lines.append(f"| data loading share of an epoch (worse of the two), {e['task']} | {100 * share:.1f}% "
                     f"| ≤ {100 * TARGETS['loading_share']:.0f}% | {verdict(share, TARGETS['loading_share'])} |")
    lines.append(f"| aggregation share of a round, prr, median over K (range {100 * min(shares):.2f}-"
                 f"{100 * max(shares):.2f}%) | {100 * aggregation_share:.2f}% "
                 f"| ≤ {100 * TARGETS['aggregation_share']:.0f}% | {verdict(aggregation_share, TARGETS['aggregation_share'])} |")
    growth = scale["loglog_slope"]
    for key, text in (("round_s", "round wall time"), ("round_cpu_s", "round CPU time"), ("peak_rss_mb", "peak RSS")):
        lines.append(f"| growth of {text} with K (log-log slope; 1 = linear) | {growth[key]:.2f} "
                     f"| ≤ {TARGETS['growth_slope']} | {verdict(growth[key], TARGETS['growth_slope'])} |")
    lines += ["", f"### Aggregation (K = {section['aggregation'][0]['sites']}, "
              f"{'full-width' if section.get('plan', 'full') == 'full' else 'narrow'} networks, median)", "",
              "| network | parameters | FedAvg (ms) | PFA (ms) | reference-style PFA (ms) | reference / PFA "
              "| PFA / FedAvg | max abs diff |", "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in section["aggregation"]:
        ms = {m: 1000 * v for m, v in row["median_s"].items()}
        lines.append(f"| {row['network']} | {row['parameters']:,} | {ms['fedavg']:.1f} | {ms['pfa']:.1f} "
                     f"| {ms['reference_pfa']:.1f} | {row['reference_over_pfa']:.1f}x | {row['pfa_over_fedavg']:.1f}x "
                     f"| {row['max_abs_diff_vs_reference']:.1e} |")
    lines += ["", "### One local epoch on one site (median; DET = state Exchange, both models step on every batch)", "",
              "Single = the same one model with the same loss (pfa_only: CPA), so that the ratio is DET's own cost; "
              "single CE = FedAvg's model with cross-entropy. Loading = time the training loop waits for its next "
              "batch.", "",
              "| task, site | train / val | single: train (s) | its validation (s) | DET: train (s) "
              "| two validations (s) | DET / single | same, CPU time | DET / single CE | loading share single / DET |",
              "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in epochs:
        s, d = e["median"]["single"], e["median"]["det"]
        lines.append(f"| {e['task']}, {e['site']} | {e['train_samples']} / {e['val_samples']} | {s['train_s']:.2f} "
                     f"| {s['val_s']:.2f} | {d['train_s']:.2f} | {d['val_s']:.2f} | {e['det_over_single']:.2f}x "
                     f"| {e['det_over_single_cpu']:.2f}x | {e['det_over_single_ce']:.2f}x "
                     f"| {100 * e['loading_share_single']:.1f}% / {100 * e['loading_share_det']:.1f}% |")
    lines += ["", "The single-model epoch again with other loaders (the Site prepares batches ahead in one thread):", "",
              "| task | loader | loading share | epoch time / the Site's loader |", "|:---|:---|---:|---:|"]
    for e in (e for e in epochs if "loading_share_single_inline" in e):
        lines.append(f"| {e['task']} | ThreadDataLoader, batches ahead in one thread (as the Site) "
                     f"| {100 * e['loading_share_single']:.1f}% | 1.00x |")
        for key, text in (("single_inline", "DataLoader, no workers (inline loading)"),
                          ("single_process", "DataLoader, 1 worker process")):
            lines.append(f"| {e['task']} | {text} | {100 * e[f'loading_share_{key}']:.1f}% | {e[f'{key}_over_single']:.2f}x |")
    if "loading_ms_per_image" in section:
        lines += ["", "Where the loading time goes (derm_a, 32 px, CPU ms per image for one pass over the cached "
                  "training split): " + ", ".join(f"{name} {value:.2f}" for name, value in
                                                   section["loading_ms_per_image"].items()) + "."]
    lines += ["", f"### Sites K through the coordinator (prr, dermoscopy, {scale['rounds']} rounds x 1 epoch; means of "
              "the rounds that aggregate)", "",
              "| K | train samples | round (s) | round CPU (s) | per 1000 samples (s) | aggregation (ms) | share "
              "| peak RSS (MB) "
              "| RSS after imports (MB) | up / round (MiB) | down / round (MiB) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in scale["rows"]:
        lines.append(f"| {r['sites']} | {r['train_samples']} | {r['round_s']:.1f} | {r['round_cpu_s']:.1f} "
                     f"| {1000 * r['round_s'] / r['train_samples']:.1f} | {1000 * r['aggregation_s']:.0f} "
                     f"| {100 * r['aggregation_share']:.2f}% | {r['peak_rss_mb']:.0f} | {r['rss_after_imports_mb']:.0f} "
                     f"| {r['upload_bytes_per_round'] / 2**20:.2f} | {r['download_bytes_per_round'] / 2**20:.2f} |")
    lines += ["", "Log-log slopes against K: " + ", ".join(f"{k} {v:.2f}" for k, v in growth.items())
              + " (1 = linear; round_s_vs_train_samples is against the total number of training samples "
              "rather than K, since the extra sites differ in size)."]
    if "volumetric" in section:
        lines += ["", volumetric_markdown(section["volumetric"])]
    return "\n".join(lines)


def figure(section: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    from medfl.report.plots import save_png

    fig = Figure(figsize=(20, 3.8), layout="constrained")
    a, b, c, d, e = fig.subplots(1, 5)
    rows = section["aggregation"]
    labels = {"fedavg": "FedAvg", "pfa": "medfl PFA", "reference_pfa": "reference-style PFA"}
    for offset, method in enumerate(labels):
        a.bar([i + (offset - 1) * 0.27 for i in range(len(rows))], [1000 * r["median_s"][method] for r in rows], 0.27,
              label=labels[method])
    a.set_xticks(range(len(rows)), [r["network"] for r in rows])
    a.set_yscale("log")
    a.set_ylabel("ms per aggregation (log)")
    a.set_title(f"aggregation, K = {rows[0]['sites']}", fontsize=10)
    a.legend(fontsize=7)
    names, bottoms = [], []
    for epoch in section["epochs"]:  # in units of the single-model training time of the same case
        unit = epoch["median"]["single"]["train_s"]
        for key, label in (("single", "single"), ("det", "DET")):
            m = {name: value / unit for name, value in epoch["median"][key].items()}
            short = epoch["task"].replace("dermoscopy", "derm").replace("prostate", "prost").replace("-128px-x1", " 128")
            names.append(f"{short}\n{label}")
            bottoms.append((m["load_s"], m["train_s"] - m["load_s"], m["val_s"]))
    positions = range(len(names))
    b.bar(positions, [x[0] for x in bottoms], color="C2", label="loading batches")
    b.bar(positions, [x[1] for x in bottoms], bottom=[x[0] for x in bottoms], color="C0", label="training")
    b.bar(positions, [x[2] for x in bottoms], bottom=[x[0] + x[1] for x in bottoms], color="C1", label="validation")
    b.set_xticks(positions, names, fontsize=8)
    b.set_ylabel("epoch time / single-model training time")
    b.axhline(TARGETS["det_over_single"], color="0.5", ls=":", lw=0.8)
    b.set_title("one local epoch on one site", fontsize=10)
    b.legend(fontsize=7)
    scale = section["scale"]["rows"]
    ks = [r["sites"] for r in scale]
    c.plot(ks, [r["round_s"] for r in scale], "o-", label="round wall time (s)")
    c.plot(ks, [r["round_cpu_s"] for r in scale], "s-", label="round CPU time (s)")
    c.plot(ks, [scale[0]["round_cpu_s"] * k / ks[0] for k in ks], ":", color="0.5", label="linear from K=2")
    c.set_xscale("log", base=2)
    c.set_yscale("log")
    c.set_xlabel("sites K")
    c.set_title("round time (prr, 1 epoch)", fontsize=10)
    c.legend(fontsize=7)
    memory_key = "peak_cuda_mb" if section["device"] == "cuda" else "peak_rss_mb"
    d.plot(ks, [r[memory_key] for r in scale], "o-", label=f"{memory_key.removesuffix('_mb').replace('_', ' ')} (MB)")
    if memory_key == "peak_rss_mb":
        d.plot(ks, [r["rss_after_imports_mb"] for r in scale], ":", color="0.5", label="after imports (MB)")
    d.set_xscale("log", base=2)
    d.set_ylim(bottom=0)
    d.set_xlabel("sites K")
    d.set_title("peak memory", fontsize=10)
    d.legend(fontsize=7)
    e.plot(ks, [r["upload_bytes_per_round"] / 2**20 for r in scale], "o-", label="up (all sites)")
    e.plot(ks, [r["download_bytes_per_round"] / 2**20 for r in scale], "s--", label="down (all sites)")
    e.set_xscale("log", base=2)
    e.set_xlabel("sites K")
    e.set_ylabel("MiB per round")
    e.set_title("bytes exchanged per round", fontsize=10)
    e.legend(fontsize=7)
    info = section["machine"]
    fig.suptitle(f"{section['device']}: {info.get('gpu') or info['cpu']}, torch threads {info['torch_threads']}",
                 fontsize=10)
    save_png(fig, path)


def measure_device(device: torch.device, args: argparse.Namespace, synth: Path, plan_name: str) -> dict[str, Any]:
    plan = PLANS[plan_name]
    info = machine(device.type)
    print(f"{device}: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    run_root = args.root.resolve()
    section: dict[str, Any] = {"device": device.type, "machine": info, "plan": plan_name}
    section["aggregation"] = aggregation_rows(device.type, plan.aggregation_sites, args.repeats, 0.7, plan.networks)
    section["epochs"] = []
    for case, spec in plan.epoch_cases.items():
        section["epochs"].append(epoch_comparison(case, spec, synth, device, args.threads, args.repeats, run_root))
        e = section["epochs"][-1]
        print(f"  epoch {case}: DET/single {e['det_over_single']:.2f}x, loading "
              f"{100 * e['loading_share_single']:.1f}% / {100 * e['loading_share_det']:.1f}%", flush=True)
    if device.type == "cpu":
        section["loading_ms_per_image"] = loading_breakdown(synth, args.repeats)
    section["scale"] = scale_rows(synth, args.sites, device, args.threads, run_root, plan.scale_rounds, args.spawn)
    if plan.volumetric is not None:  # last: the sections before it measure as they did without it
        section["volumetric"] = volumetric_section(run_root, synth, device, args.threads, args.repeats,
                                                   plan.volumetric)
    info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    return section


def demo_experiments(demo: Path, plan: Plan, device: str, threads: int | None) -> Iterator[tuple[str, Any]]:
    """The shipped demo experiments on `make demo`'s data (the plan's), with their own rounds and epochs; threads
    as given, or None: the shipped `runtime.threads` (else one per core)."""
    synth = synthetic(demo / "synth", **plan.demo_synth)
    for task in plan.demo_tasks:
        shipped = f"{task}.yaml"
        sites = sorted(str(p) for p in (synth / "site_configs" / task).glob("*.yaml"))
        base = yaml.safe_load((EXPERIMENTS / shipped).read_text(encoding="utf-8"))
        budget = {**base, **plan.demo_budget}
        overrides = {k: v for k, v in plan.demo_budget.items() if k not in ("rounds", "local_epochs")}
        used = threads or base.get("runtime", {}).get("threads") or os.cpu_count()
        yield task, experiment(f"demo-{task}", shipped, base["method"], sites, device, used, budget["rounds"],
                               budget["local_epochs"], demo / "runs", overrides)


def evaluation_share(root: Path, device: torch.device, threads: int, plan: Plan) -> list[dict[str, Any]]:
    """The shipped demo experiments as `make demo` runs them (their own rounds, epochs and data: the default
    `medfl synth`), and from each run's own accounting (timing.csv: seconds the sites spent training and
    scoring, samples scored): the evaluation share of a round and the cost per evaluated sample."""
    from medfl.federated.coordinator import Coordinator
    from medfl.runfolder import RunFolder
    from medfl.tasks import task_for

    demo = root / "demo"
    rows = []
    for task, config in demo_experiments(demo, plan, device.type, threads):
        run_dir = demo / "runs" / f"demo-{task}"
        shutil.rmtree(run_dir, ignore_errors=True)
        wall, cpu = time.perf_counter(), time.process_time()
        Coordinator(config, run_dir, device, task=task_for(config.task)).run()
        timing = RunFolder(run_dir).timing()
        train, scoring = sum(r["train_s"] for r in timing), sum(r["eval_s"] for r in timing)
        samples = sum(r["eval_samples"] for r in timing)
        rows.append({"task": task, "rounds": len(timing), "local_epochs": config.local_epochs, "train_s": train,
                     "eval_s": scoring, "eval_share": scoring / (train + scoring), "eval_samples": samples,
                     "eval_ms_per_sample": 1000 * scoring / samples, "run_wall_s": time.perf_counter() - wall,
                     "run_cpu_s": time.process_time() - cpu})
        print(f"  evaluation, {task} demo: {100 * rows[-1]['eval_share']:.1f}% of the sites' time, "
              f"{rows[-1]['eval_ms_per_sample']:.2f} ms per evaluated sample", flush=True)
    return rows


def evaluation_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| demo experiment | rounds x epochs | training (s) | evaluation (s) | evaluation share | target | met "
             "| samples scored | ms per sample |", "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['rounds']} x {r['local_epochs']} | {r['train_s']:.1f} | {r['eval_s']:.1f} "
                     f"| {100 * r['eval_share']:.1f}% | ≤ {100 * TARGETS['evaluation_share']:.0f}% "
                     f"| {verdict(r['eval_share'], TARGETS['evaluation_share'])} | {int(r['eval_samples'])} "
                     f"| {r['eval_ms_per_sample']:.2f} |")
    return "\n".join(lines)


# ---- 5. sites side by side --------------------------------------------------------------------------------


def worker_startup_s(imports: str) -> float:
    """What a worker process pays before it can read data: a fresh interpreter running `imports` (the plan's:
    importing torch and MONAI)."""
    import subprocess

    tick = time.perf_counter()
    subprocess.run([sys.executable, "-c", imports], check=True)
    return time.perf_counter() - tick


def parallel_run(job: dict[str, Any]) -> dict[str, Any]:
    """One run in a fresh process, sequential or with workers: wall time of the run and of each round, each
    site's own training time per round (from its audit log's reports), CPU time of this process, the fork
    server and the workers it reaped (/proc), peak RSS of this process and of every worker (summed)."""
    torch.set_num_threads(job["threads"])
    from multiprocessing import forkserver

    from medfl.experiment import load_experiment_config
    from medfl.federated.coordinator import Coordinator
    from medfl.tasks import task_for

    config = load_experiment_config(job["config"])
    run_dir = Path(job["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    workers_rss: dict[int, float] = {}

    def observe(event: str, info: dict[str, Any]) -> None:
        if event == "round":
            for worker in getattr(coordinator.federation, "workers", []):
                workers_rss[worker.process.pid] = max(workers_rss.get(worker.process.pid, 0.0),
                                                      proc_status_mb(worker.process.pid, "VmHWM"))

    wall, cpu = time.perf_counter(), time.process_time()
    coordinator = Coordinator(config, run_dir, torch.device("cpu"), progress=observe, parallel=job["parallel"],
                              task=task_for(config.task))
    coordinator.run()
    wall = time.perf_counter() - wall
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)  # noqa: SLF001 - its CPU, /proc only
    train: dict[int, list[float]] = {}
    for site in (run_dir / "sites").iterdir():
        for line in (site / "audit.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if entry["what"] == "report":
                train.setdefault(entry["round"], []).append(entry["timing"]["train_s"])
    rounds = [t["round_s"] for t in coordinator.timing]
    workers = len(getattr(coordinator.federation, "workers", [])) or 1
    return {"parallel": job["parallel"], "workers": workers, "run_wall_s": wall, "round_s": statistics.fmean(rounds),
            "slowest_site_train_s": statistics.fmean(max(v) for v in train.values()),
            "sum_site_train_s": statistics.fmean(sum(v) for v in train.values()),
            "cpu_s": time.process_time() - cpu + (proc_cpu_s(server) if server else 0.0),
            "peak_rss_mb": peak_rss_mb(), "workers_peak_rss_mb": sum(workers_rss.values())}


def proc_status_mb(pid: int, key: str) -> float:
    """A value of /proc/<pid>/status in MB (nan where it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of a process and of the children it reaped, from /proc/<pid>/stat (nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def parallel_rows(synth: Path, ks: list[int], threads: int, run_root: Path, rounds: int,
                  spawn: Spawner) -> list[dict[str, Any]]:
    """For every K: the same prr run sequential and with K workers, each in a fresh process."""
    configs = sorted((synth / "site_configs" / "dermoscopy").glob("*.yaml"))
    rows = []
    for k in ks:
        row: dict[str, Any] = {"sites": k, "cores": os.cpu_count()}
        for label, workers in (("sequential", 1), ("parallel", k)):
            config = experiment(f"parallel-{label}", "dermoscopy.yaml", "prr", [str(p) for p in configs[:k]], "cpu",
                                threads * workers, rounds, 1, run_root)  # the same threads per site
            job = {"config": str(config.source_path), "run_dir": str(run_root / "parallel" / f"{label}-k{k}"),
                   "threads": threads, "parallel": workers}
            row[label] = spawn(parallel_run, job)
            result = row[label]
            result["round_over_slowest_site"] = result["round_s"] / result["slowest_site_train_s"]
        rows.append(row)
        print(f"  K={k}: round {row['sequential']['round_s']:.1f} s sequential, {row['parallel']['round_s']:.1f} s "
              f"with {k} workers ({row['parallel']['round_over_slowest_site']:.2f}x the slowest site)", flush=True)
    return rows


def parallel_markdown(rows: list[dict[str, Any]], startup_s: float) -> str:
    lines = [f"Worker start-up (a fresh interpreter importing torch and MONAI): {startup_s:.1f} s.\n",
             "| K | cores | run | round (s) | slowest site's training (s) | sum of sites' training (s) "
             "| round / slowest site | target | met | run wall (s) | CPU, all processes (s) | peak RSS (MB) "
             "| workers' peak RSS, summed (MB) |", "|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    limit = TARGETS["round_over_slowest_site"]
    for row in rows:
        for label in ("sequential", "parallel"):
            r = row[label]
            applies = label == "parallel" and row["cores"] >= row["sites"]
            lines.append(f"| {row['sites']} | {row['cores']} | {label} | {r['round_s']:.2f} "
                         f"| {r['slowest_site_train_s']:.2f} | {r['sum_site_train_s']:.2f} "
                         f"| {r['round_over_slowest_site']:.2f} | {f'≤ {limit}' if applies else '-'} "
                         f"| {verdict(r['round_over_slowest_site'], limit) if applies else '-'} | {r['run_wall_s']:.1f} "
                         f"| {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['workers_peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def demo_rows(root: Path, plan: Plan, spawn: Spawner) -> list[dict[str, Any]]:
    """The demo experiments as `make demo` runs them (their data, rounds, epochs and `runtime.threads`), each run
    as shipped (`parallel_sites: 1`) and with `parallel_sites: auto`, each in a fresh process."""
    demo = root / "demo"
    rows = []
    for task, config in demo_experiments(demo, plan, "cpu", None):
        threads = config.runtime.threads
        sites = config.sites
        row: dict[str, Any] = {"task": task, "sites": len(sites), "cores": os.cpu_count(), "threads": threads}
        for label, setting in (("sequential", 1), ("parallel", "auto")):
            job = {"config": str(config.source_path), "run_dir": str(demo / "runs" / f"{task}-{label}"),
                   "threads": threads, "parallel": setting}
            row[label] = spawn(parallel_run, job)
        rows.append(row)
        print(f"  demo {task}: {row['sequential']['run_wall_s']:.1f} s as shipped, {row['parallel']['run_wall_s']:.1f} s "
              f"with parallel_sites auto ({row['parallel']['workers']} workers)", flush=True)
    return rows


def demo_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| demo experiment | sites | runtime.threads | as shipped (s) | parallel_sites auto (s) | workers | "
             "ratio | CPU as shipped (s) | CPU auto (s) | peak RSS, all processes, auto (MB) |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        seq, par = r["sequential"], r["parallel"]
        lines.append(f"| {r['task']} | {r['sites']} | {r['threads']} | {seq['run_wall_s']:.1f} | {par['run_wall_s']:.1f} "
                     f"| {par['workers']} | {par['run_wall_s'] / seq['run_wall_s']:.2f} | {seq['cpu_s']:.1f} "
                     f"| {par['cpu_s']:.1f} | {par['peak_rss_mb'] + par['workers_peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def parallel_figure(rows: list[dict[str, Any]], demos: list[dict[str, Any]], path: Path) -> None:
    """Round wall time against K, one after another and side by side, with the slowest site's own training; the
    demo runs' wall time beside it."""
    from matplotlib.figure import Figure

    from medfl.report.plots import save_png

    figure = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = figure.subplots(1, 2)
    ks = [row["sites"] for row in rows]
    for label, colour in (("sequential", "C0"), ("parallel", "C3")):
        left.plot(ks, [row[label]["round_s"] for row in rows], "o-", color=colour, label=f"round, {label}")
    left.plot(ks, [row["parallel"]["slowest_site_train_s"] for row in rows], "k--", label="slowest site's training")
    left.set_xlabel("sites K")
    left.set_ylabel("seconds per round")
    left.set_xticks(ks)
    left.legend(fontsize=8)
    left.set_title("prr round, one after another vs K workers", fontsize=10)
    names = [row["task"] for row in demos]
    for offset, (label, colour) in zip((-0.2, 0.2), (("sequential", "C0"), ("parallel", "C3")), strict=True):
        right.bar([i + offset for i in range(len(demos))], [row[label]["run_wall_s"] for row in demos], 0.4,
                  color=colour, label="as shipped" if label == "sequential" else "parallel_sites auto")
    right.set_xticks(range(len(demos)), names)
    right.set_ylabel("run wall time (s)")
    right.legend(fontsize=8)
    right.set_title("demo experiments", fontsize=10)
    save_png(figure, path)


def sites_side_by_side(args: argparse.Namespace, command: str, plan_name: str) -> int:
    """Section 5 on the CPU; <output>.parallel.json and .md."""
    plan = PLANS[plan_name]
    root = args.root.resolve()
    synth = synthetic(root / "parallel-synth", n_derm=max(args.sites), **plan.synth)
    info = machine("cpu")
    startup = worker_startup_s(plan.worker_imports)
    rows = parallel_rows(synth, args.sites, args.threads, root, plan.scale_rounds, args.spawn)
    demos = demo_rows(root, plan, args.spawn)
    info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    stem = args.output.parent / f"{args.output.name}.parallel"
    atomic_write_json(stem.parent / f"{stem.name}.json", {"command": command, "machine": info,
                                                          "worker_startup_s": startup, "rows": rows, "demos": demos})
    parallel_figure(rows, demos, stem.parent / f"{stem.name}.png")
    text = (f"# Sites side by side\n\n`{command}`\n\nThe same prr run (1 epoch per round) at K dermoscopy sites, "
            f"one after another and with K worker processes, {args.threads} torch thread(s) per site. Machine: "
            f"{info['cpu']}, load average {info.get('load_average_1min')} at the start, "
            f"{info['load_average_1min_end']} at the end.\n\n{parallel_markdown(rows, startup)}\n\n"
            "The demo experiments (`make demo`'s data, rounds, epochs and `runtime.threads`), as shipped (the sites one "
            "after another, each with all the threads) and with `runtime.parallel_sites: auto` (`medfl run "
            f"--parallel auto`: the threads shared out among the workers):\n\n{demo_markdown(demos)}\n")
    atomic_write_text(stem.parent / f"{stem.name}.md", text)
    print(text)
    return 0


# ---- 6. DET's cost by phase -------------------------------------------------------------------------------

DET_PROFILE_CASE = "dermoscopy-128px-x1"  # where DET's extra cost was largest (2.61x on an idle AMD EPYC core)
PROFILED_OPS = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::native_batch_norm",
                "aten::native_batch_norm_backward", "aten::threshold_backward", "aten::max_pool2d_with_indices",
                "aten::fill_", "aten::_foreach_lerp_", "aten::lerp_", "aten::add_", "aten::mul_")


def det_phases(case: str, spec: tuple[str, str, str, dict[str, Any], bool], synth: Path, threads: int,
               repeats: int, batches: int, run_root: Path) -> dict[str, Any]:
    """Where a DET step's time goes, against a single-model step on the same batches, taking turns: forward,
    losses, backward and optimizer step per batch (the loop of medfl.federated.training.train_epoch, timed by
    phase), then each op's self CPU time from torch's profiler over one pass of each. Two ways to run DET's
    backward are compared: one backward over the sum of both losses (what train_epoch does) and one per model."""
    from torch.profiler import ProfilerActivity, profile

    from medfl.config import load_site_config
    from medfl.data.tensors import plain_tensors
    from medfl.federated.det import DetState
    from medfl.federated.evaluation import evaluate_model
    from medfl.federated.site import Site
    from medfl.federated.training import EpochPlan, _batch_losses
    from medfl.tasks import task_for

    folder, shipped, site_name, overrides, _ = spec
    config_path = str(synth / "site_configs" / folder / f"{site_name}.yaml")
    device = torch.device("cpu")
    sites = {}
    for method in ("prr", "pfa_only"):
        config = experiment("det-phases", shipped, method, [config_path], "cpu", threads, 1, 1, run_root, overrides)
        site = Site(load_site_config(config_path), config, run_root / "det-phases" / method, device,
                    task=task_for(config.task))
        site.initialize()
        sites[method] = site
    loader = torch.utils.data.DataLoader(sites["prr"].datasets["train"], batch_size=sites["prr"].experiment.batch_size,
                                         shuffle=False)
    data = list(itertools.islice(loader, batches))

    def step_loop(site: Site, state: DetState | None, how: str, phases: dict[str, float]) -> None:
        """`how`: "joint" (one backward over the sum of the losses, as train_epoch), "split" (one backward per
        model, after both forwards) or "teacher_first" (one-way states: the teacher's forward, loss and backward,
        then the student's, so that one model's graph is alive at a time)."""
        models, optimizers = site.models, site.trainer.optimizers
        plan = EpochPlan(state=state)
        used = "P" if "P" in models else "M"
        for model in models.values():
            model.train()
        for batch in data:  # batches of plain tensors (plain_tensors: as train_epoch runs)
            tick = time.perf_counter()
            images = torch.as_tensor(batch["image"])
            labels = site.task.batch_labels(batch, device)
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            if how == "teacher_first":
                teacher, student = ("D", "P") if state is DetState.SUBLIMATE else ("P", "D")
                logits, _ = models[teacher](images)
                phases["forward"] += time.perf_counter() - tick
                tick = time.perf_counter()
                site.trainer.loss(logits.float(), labels, plan.gamma).backward()
                phases["backward"] += time.perf_counter() - tick
                tick = time.perf_counter()
                outputs = {teacher: (logits.detach(), None), student: models[student](images)}
                phases["forward"] += time.perf_counter() - tick
                tick = time.perf_counter()
                losses = _batch_losses(models, outputs, labels, site.trainer.loss, plan, used)
                phases["losses"] += time.perf_counter() - tick
                tick = time.perf_counter()
                losses[student].backward()
                phases["backward"] += time.perf_counter() - tick
            else:
                outputs = {name: model(images) for name, model in models.items()}
                phases["forward"] += time.perf_counter() - tick
                tick = time.perf_counter()
                losses = _batch_losses(models, outputs, labels, site.trainer.loss, plan, used)
                phases["losses"] += time.perf_counter() - tick
                tick = time.perf_counter()
                if how == "split":
                    for loss in losses.values():
                        loss.backward()
                else:
                    sum(losses.values()).backward()
                phases["backward"] += time.perf_counter() - tick
            tick = time.perf_counter()
            for optimizer in optimizers.values():
                optimizer.step()
            phases["step"] += time.perf_counter() - tick

    variants = {"single": (sites["pfa_only"], None, "joint"),
                "det": (sites["prr"], DetState.EXCHANGE, "joint"),
                "det_split_backward": (sites["prr"], DetState.EXCHANGE, "split"),
                "det_sublimate": (sites["prr"], DetState.SUBLIMATE, "joint"),
                "det_sublimate_teacher_first": (sites["prr"], DetState.SUBLIMATE, "teacher_first")}
    timed_phases: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for repeat in range(repeats + 1):  # the first pass warms up and is not kept
        for name, (site, state, how) in variants.items():
            phases = dict.fromkeys(("forward", "losses", "backward", "step"), 0.0)
            with plain_tensors():
                step_loop(site, state, how, phases)
            if repeat:
                timed_phases[name].append(phases)
    median = {name: {phase: statistics.median(r[phase] for r in rows) for phase in rows[0]}
              for name, rows in timed_phases.items()}
    val = torch.utils.data.DataLoader(sites["prr"].datasets["val"], batch_size=32, shuffle=False)
    model = sites["prr"].models["P"]
    val_s = statistics.median(timed(lambda: evaluate_model(model, val, sites["prr"].task, sites["prr"].classes,
                                                           device), device)[0] for _ in range(max(1, repeats)))
    ops: dict[str, dict[str, float]] = {}
    for name, (site, state, how) in variants.items():
        with profile(activities=[ProfilerActivity.CPU]) as profiler, plain_tensors():
            step_loop(site, state, how, dict.fromkeys(("forward", "losses", "backward", "step"), 0.0))
        averages = {entry.key: entry for entry in profiler.key_averages()}
        ops[name] = {op: {"self_s": averages[op].self_cpu_time_total / 1e6, "calls": averages[op].count}
                     for op in PROFILED_OPS if op in averages}
        ops[name]["total"] = {"self_s": sum(e.self_cpu_time_total for e in averages.values()) / 1e6, "calls": 0}
    train_samples, val_samples = len(sites["prr"].datasets["train"]), len(sites["prr"].datasets["val"])
    per_epoch = train_samples / (len(data) * loader.batch_size)  # this probe's batches scaled to a whole epoch
    epoch = {name: per_epoch * sum(phases.values()) for name, phases in median.items()}
    return {"case": case, "batches": len(data), "batch_size": loader.batch_size,
            "train_samples": train_samples, "val_samples": val_samples, "median_s": median, "ops": ops,
            "validation_pass_s": val_s, "epoch_s": epoch,
            **{f"{name}_over_single": (epoch[name] + 2 * val_s) / epoch["single"] for name in variants if name != "single"}}


def det_phases_markdown(result: dict[str, Any]) -> str:
    median, ops = result["median_s"], result["ops"]
    lines = [f"{result['batches']} batches of {result['batch_size']} ({result['case']}), seconds summed over the "
             "batches, median of the repeats:", "",
             "| step | forward | losses | backward | optimizer step | total | / single |", "|:---|---:|---:|---:|---:|---:|---:|"]
    single = sum(median["single"].values())
    for name, phases in median.items():
        total = sum(phases.values())
        lines.append(f"| {name} | " + " | ".join(f"{phases[k]:.2f}" for k in ("forward", "losses", "backward", "step"))
                     + f" | {total:.2f} | {total / single:.2f} |")
    lines += ["", f"One validation pass over the {result['val_samples']} validation images: "
              f"{result['validation_pass_s']:.2f} s (DET makes two per epoch). A whole epoch of "
              f"{result['train_samples']} images, scaled from these batches, with DET's two validation passes, over a "
              "single-model epoch: " + ", ".join(f"{name} {result[f'{name}_over_single']:.2f}x" for name in median
                                                 if name != "single") + ".", "",
              "Self CPU time by op, one profiled pass each (seconds; over single in brackets):", "",
              "| op | " + " | ".join(median) + " |", "|:---|" + "---:|" * len(median)]
    for op in [*PROFILED_OPS, "total"]:
        if op not in ops["single"]:
            continue
        base = ops["single"][op]["self_s"]
        cells = [f"{base:.2f}"] + [
            f"{ops[name][op]['self_s']:.2f} ({ops[name][op]['self_s'] / base:.2f}x)" if op in ops[name] and base else "–"
            for name in median if name != "single"]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def det_profile(args: argparse.Namespace, command: str, plan_name: str) -> int:
    """Section 6 on the CPU; <output>.det.json and .md."""
    plan = PLANS[plan_name]
    synth = synthetic(args.root.resolve() / "synth", n_derm=1, **{**plan.synth, "n_prostate": 0})
    case = DET_PROFILE_CASE if DET_PROFILE_CASE in plan.epoch_cases else next(iter(plan.epoch_cases))
    info = machine("cpu")
    result = det_phases(case, plan.epoch_cases[case], synth, args.threads, args.repeats, 12 if plan_name == "full" else 1, args.root.resolve())
    info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    stem = args.output.parent / f"{args.output.name}.det"
    atomic_write_json(stem.parent / f"{stem.name}.json", {"command": command, "machine": info, **result})
    text = (f"# DET's cost by phase\n\n`{command}`\n\nMachine: {info['cpu']}, {args.threads} torch thread(s), load "
            f"average {info.get('load_average_1min')} at the start, {info['load_average_1min_end']} at the end.\n\n"
            f"{det_phases_markdown(result)}\n")
    atomic_write_text(stem.parent / f"{stem.name}.md", text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spawned runs inherit it: medfl.environment says why
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU, and CUDA too when a GPU is present")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of aggregations and epochs")
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8, 16], help="values of K")
    parser.add_argument("--root", type=Path, default=RESULTS / "tmp" / "speed", help="data and runs")
    parser.add_argument("--output", type=Path, default=RESULTS / "speed", help="path stem of the results")
    parser.add_argument("--evaluation-only", action="store_true",
                        help="only the evaluation share of the demo experiments (results in <output>.evaluation.*)")
    parser.add_argument("--parallel-sites", action="store_true",
                        help="only section 5, sites side by side, and the demo experiments as shipped and with parallel_sites auto (results in <output>.parallel.*); default K: 2 4 8")
    parser.add_argument("--det-profile", action="store_true",
                        help=f"only section 6, DET's cost by phase at {DET_PROFILE_CASE} (results in <output>.det.*)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"every section, the evaluation share and sites side by side too, on tiny data: narrow networks, K = "
                             f"{', '.join(map(str, SMOKE_SITES))}, one repeat, the runs meant for fresh processes in one "
                             "spawned process; data, runs and results go to a temporary folder that is removed")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
               "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    torch.set_num_threads(args.threads)
    command = ("python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    args.spawn = Spawner()  # a fresh interpreter for every K and every run of section 5
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp, contextlib.closing(Spawner(shared=True)) as args.spawn:
            args.root, args.output = Path(tmp) / "root", Path(tmp) / "speed"
            args.repeats, args.sites = 1, SMOKE_SITES
            status = 0 if args.evaluation_only or args.parallel_sites else measure(args, devices, command, "smoke")
            status = status or (0 if args.parallel_sites else evaluation(args, devices, command, "smoke"))
            args.sites = SMOKE_PARALLEL_SITES
            status = status or (0 if args.det_profile else sites_side_by_side(args, command, "smoke"))
            return status or det_profile(args, command, "smoke")
    if args.det_profile:
        return det_profile(args, command, "full")
    if args.parallel_sites:
        if args.sites == parser.get_default("sites"):
            args.sites = [2, 4, 8]
        return sites_side_by_side(args, command, "full")
    if args.evaluation_only:
        return evaluation(args, devices, command, "full")
    return measure(args, devices, command, "full")


def evaluation(args: argparse.Namespace, devices: list[str], command: str, plan_name: str) -> int:
    """The evaluation share of the demo experiments on the first device; <output>.evaluation.json and .md."""
    device = torch.device(devices[0])
    rows = evaluation_share(args.root.resolve(), device, args.threads, PLANS[plan_name])
    info = machine(device.type)
    stem = args.output.parent / f"{args.output.name}.evaluation"
    atomic_write_json(stem.parent / f"{stem.name}.json", {"command": command, "machine": info, "rows": rows})
    text = (f"# Evaluation share of a round\n\n`{command}`\n\nThe shipped demo experiments "
            "(`site_configs/experiments/*.yaml`) on the default `medfl synth` data, as `make demo` runs them; "
            "seconds from each run's timing.csv (the sites' own accounting of training and scoring). "
            f"Machine: {info['cpu']}, {info['torch_threads']} torch thread(s), load average "
            f"{info.get('load_average_1min')} at the start.\n\n{evaluation_markdown(rows)}\n")
    atomic_write_text(stem.parent / f"{stem.name}.md", text)
    print(text)
    return 0


def measure(args: argparse.Namespace, devices: list[str], command: str, plan_name: str) -> int:
    """Sections 1-4 on every device; <output>.json, .md and a figure per device. 1 when PFA differs from the
    reference-style PFA."""
    synth = synthetic(args.root.resolve() / "synth", n_derm=max(args.sites), **PLANS[plan_name].synth)
    start = time.perf_counter()
    sections = {name: measure_device(torch.device(name), args, synth, plan_name) for name in devices}
    atomic_write_json(args.output.with_suffix(".json"), {"command": command, "targets": TARGETS,
                                                         "wall_s": time.perf_counter() - start, "devices": sections})
    text = "\n\n".join(device_markdown(section) for section in sections.values())
    atomic_write_text(args.output.with_suffix(".md"), (
        f"# Speed and scale\n\n`{command}`\n\nSynthetic data `medfl.synth.generate(scale=0.1)`; networks and "
        "sizes of the shipped experiments (slim VGG-16 x0.25 at 32 px, UNet x0.5 at 64 px), except the aggregation "
        "table, which uses full-width networks, and the epoch row `dermoscopy-128px-x1` (the reference's input size "
        "and width). Every ratio below was measured in this one run, side by side. "
        f"Total {(time.perf_counter() - start) / 60:.1f} min.\n\n{text}\n"))
    for name, section in sections.items():
        figure(section, args.output.with_suffix(".png" if name == "cpu" else f".{name}.png"))
    print(text)
    aggregation_ok = all(row["equal_within_1e-5"] for s in sections.values() for row in s["aggregation"])
    if not aggregation_ok:
        print("medfl PFA differs from the reference-style PFA by more than 1e-5", file=sys.stderr)
    return 0 if aggregation_ok else 1


if __name__ == "__main__":
    sys.exit(main())
