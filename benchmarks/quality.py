"""Quality of the method against its baselines and ablations on synthetic federations.

Writes a synthetic data set with `medfl.synth.generate` (dermoscopy: 4 sites, prostate: 6 sites), then runs
the shipped experiments (site_configs/experiments/*.yaml) with the Coordinator for every method and seed:
the same data, network, rounds, local epochs and seeds for all of them; only `method` (and the seed) change.
Main methods: local, fedavg, fedbn, fml, prr; ablations (fewer seeds): fedavg_det, pfa_only, prr_ce, and
prr_amplitude (PFA sharing the amplitude only, the MICCAI version that algorithm.md offers as an option).

Reported per site and as the mean over sites, mean ± sample sd across seeds: test macro-F1, the F1 of the
federation's rarest training class, AUC and accuracy (dermoscopy), Dice and HD95 (prostate), at the round
each site's validation score selected; retrogress and recovery of the model that receives the server's
weights; curve dips of the model each site uses (algorithm.md). Paired differences (same seed) of prr
against fedavg and fedbn answer the benchmark's question.

    python benchmarks/quality.py --quick     # dermoscopy only, 2 seeds, 10 rounds x 3 epochs
    python benchmarks/quality.py             # both tasks, the 2-core CPU plan (see PRESETS)
    python benchmarks/quality.py --imbalanced   # dermoscopy with rare classes kept rare, 2 seeds
    python benchmarks/quality.py --full      # the reference settings, for a GPU machine
    python benchmarks/quality.py --threed    # prostate in 2-D and 3-D on the same sites: local, fedavg, prr, 1 seed
    python benchmarks/quality.py --threed --seeds 3   # more seeds (finished runs are reused)
    python benchmarks/quality.py --full-3d   # --threed at the reference scale, for a GPU machine
    python benchmarks/quality.py --smoke     # every step on tiny data, one worker, nothing kept (the suite runs it)

Runs go to benchmarks/results/tmp/quality/<preset>/ (finished runs are reused, interrupted ones resumed);
results to benchmarks/results/quality[.quick|.full|.threed|...].{json,md,png} and quality[...].<task>.curves.png.
The prostate3d task is prostate in 3-D (data.dims 3) on the prostate task's sites: where a preset has both, the
results open with a table of the two side by side on the same test cases (Dice and HD95 on each case's own grid).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from medfl.checkpoints import atomic_write_json, atomic_write_text
from medfl.methods import method_spec

BENCHMARKS = Path(__file__).resolve().parent
REPOSITORY = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
EXPERIMENTS = REPOSITORY / "site_configs" / "experiments"
MAIN_METHODS = ("local", "fedavg", "fedbn", "fml", "prr")
THREED_METHODS = ("local", "fedavg", "prr")  # the 2-D against 3-D comparison (--threed)
ABLATIONS = ("fedavg_det", "pfa_only", "prr_ce", "prr_amplitude", "prr_phi_train")
BATCHNORM_UNET = ("fedavg_bnunet", "fedbn_bnunet", "prr_bnunet")
# Ablations that are a method with other options: label -> (method, experiment overrides).
VARIANTS = {
    "prr_amplitude": ("prr", {"pfa": {"share_phase": False}}),  # PFA as in the MICCAI paper
    "prr_phi_train": ("prr", {"det": {"phi_source": "train"}}),  # DET's phi from the training data (reference code)
    # The UNet with BatchNorm instead of affine instance norm: FedBN's and the collapse's mechanism is BatchNorm.
    **{label: (label.removesuffix("_bnunet"), {"model": {"options": {"norm": "batch"}}}) for label in BATCHNORM_UNET},
    # Whether the reference's plain SGD (lr 1e-2, no momentum) learns within the prostate budget.
    "local_sgd": ("local", {"optimizer": {"name": "sgd", "lr": 1e-2, "momentum": 0.0}}),
}
# Single-model methods whose model is the one the server overwrites: scored after local training and selected per
# site, they are FedAvg or FedBN plus local fine-tuning, and the tables call them so.
FINE_TUNED = {"fedavg": "fedavg-FT", "fedbn": "fedbn-FT", "pfa_only": "pfa_only-FT", "fedavg_bnunet": "fedavg_bnunet-FT",
              "fedbn_bnunet": "fedbn_bnunet-FT"}
TASKS = {"dermoscopy": ("classification", "dermoscopy.yaml"), "prostate": ("segmentation", "prostate.yaml"),
         "prostate3d": ("segmentation", "prostate3d.yaml")}
# Tasks that read another task's synthetic sites: the 3-D plan segments the very cases the 2-D one does, so that
# both are scored on the same test cases.
DATA_OF = {"prostate3d": "prostate"}
SEGMENTATION = ("prostate", "prostate3d")


@dataclass(frozen=True)
class TaskPlan:
    """One task's budget: rounds, local epochs, seeds, and overrides of the shipped experiment (sizes only)."""

    rounds: int
    local_epochs: int
    seeds: int
    warmup_rounds: int | None = None  # None: medfl's default, 30% of the rounds
    overrides: dict[str, Any] = field(default_factory=dict)
    ablations: tuple[str, ...] | None = None  # None: the preset's list
    scale: float | None = None  # this task's synthetic data scale (None: the preset's)
    methods: tuple[str, ...] = MAIN_METHODS  # the main methods run (with `seeds` seeds each)

    @property
    def warmup(self) -> int:
        return self.warmup_rounds if self.warmup_rounds is not None else int(round(0.3 * self.rounds))


@dataclass(frozen=True)
class Preset:
    """Data scale, device, and the plan of each task (tasks not listed are not run)."""

    description: str
    scale: float
    device: str
    tasks: dict[str, TaskPlan]
    ablation_seeds: int = 1
    ablations: tuple[str, ...] = ABLATIONS
    minimums: tuple[int, ...] | None = None  # synth's minimums (train, val, test[, prostate cases]); None: its defaults
    shift: str = "mild"  # `medfl synth --shift`: how much the sites differ
    sites: dict[str, int] = field(default_factory=lambda: {"dermoscopy": 4, "prostate": 6})  # sites per task
    seeds_first: bool = False  # run every planned run of seed 0 before any of seed 1 (else longest runs first)
    fresh_processes: bool = False  # each run in a fresh process, so that its peak memory is its own
    probe: bool = True  # the aggregation probe on prr's first seed (2-D tasks only)

    def scale_of(self, task: str) -> float:
        return self.tasks[task].scale or self.scale

    def generate_arguments(self, task: str) -> dict[str, Any]:
        """The arguments of `medfl.synth.generate` for one task's sites (each task is written by its own call
        into the same folder: sites are independent of each other)."""
        from medfl.synth import Minimums

        data = DATA_OF.get(task, task)
        arguments = {"scale": self.scale_of(task), "n_derm": self.sites["dermoscopy"] if data == "dermoscopy" else 0,
                     "n_prostate": self.sites["prostate"] if data == "prostate" else 0,
                     "minimums": Minimums(*self.minimums) if self.minimums else None}
        return {**arguments, "shift": self.shift} if self.shift != "mild" else arguments

    def data_text(self) -> str:
        minimums = f", minimums=Minimums{self.minimums}" if self.minimums else ""
        shift = f", shift={self.shift!r}" if self.shift != "mild" else ""
        return "; ".join(f"{task}: the {DATA_OF[task]} sites" if DATA_OF.get(task) in self.tasks else
                         f"{task}: `medfl.synth.generate(scale={self.scale_of(task)}{minimums}{shift})`"
                         for task in self.tasks)

    def data_sets(self) -> list[dict[str, Any]]:
        """The `generate` arguments of each synthetic data set the tasks read, each once (the 2-D and the 3-D
        prostate plans read one set). Tasks that share a set must ask for the same one: the second call would
        overwrite the first's files."""
        chosen: dict[str, dict[str, Any]] = {}
        for task in self.tasks:
            data, arguments = DATA_OF.get(task, task), self.generate_arguments(task)
            if chosen.setdefault(data, arguments) != arguments:
                raise ValueError(f"task {task} reads the {data} sites with other synth arguments than another task")
        return list(chosen.values())

    def ablations_of(self, task: str) -> tuple[str, ...]:
        listed = self.tasks[task].ablations
        return self.ablations if listed is None else listed


# The realistic federation's plan (issue: every site >= 200 local steps per round, E = 5): sizes set from the
# synthetic data's training counts at this scale; see benchmarks/README.md for the measured steps and time.
REALISTIC_DERMOSCOPY = TaskPlan(  # scale 0.6: the smallest site (derm_c, 686 images) makes 215 steps per round
    rounds=10, local_epochs=5, seeds=3, scale=0.6,
    overrides={"data": {"input_size": 32}, "batch_size": 16, "diagnostics": {"bn_reestimation": True},
               # The reference optimizer: plain SGD, reset every round; it learns within this budget (calibration).
               "optimizer": {"name": "sgd", "lr": 1e-2, "momentum": 0.0, "weight_decay": 1e-6, "lr_step_rounds": 5,
                             "lr_gamma": 0.5, "reset_every_round": True}},
)
REALISTIC_PROSTATE = TaskPlan(  # scale 3.4: the smallest site (prost_f, 324 slices) makes 200 steps per round
    # 4 rounds and no prr_ce: a 6-round plan with every ablation measured ~3.3 h on 2 cores (the budget is 2.5 h);
    # the issue allows cutting rounds and prostate ablations, never the main methods' seeds.
    rounds=4, local_epochs=5, seeds=3, scale=3.4, ablations=BATCHNORM_UNET + ("local_sgd",),
    overrides={"data": {"input_size": 64}, "model": {"width": 0.25}, "batch_size": 8,
               "diagnostics": {"bn_reestimation": True},
               # Adam (lr 1e-3, the reference's prostate rate), reset every round; `local_sgd` measures whether the
               # reference's plain SGD would learn within the same budget.
               "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-6, "lr_step_rounds": 5, "lr_gamma": 0.5,
                             "reset_every_round": True}},
)
# The 3-D plan (`--threed`): REALISTIC_PROSTATE's sites, cases, rounds, local epochs and optimizer, in 3-D. Volumes at
# 2 x 2 x 3 mm (the shipped prostate3d.yaml's): 61-121 voxels across the sites' 120-240 mm fields of view (prost_b 61,
# prost_e 65, prost_d 81, prost_c 88, prost_a 91, prost_f 121) and 21-24 slices; patches of 64 x 64 x 16, 2 volumes x
# 4 patches per step, UNet x0.25 (the 2-D plan's width), sliding window as shipped.
# Sized from CPU seconds measured on these sites with 1 torch thread (benchmarks/README.md, "3-D plan"; a 2-core
# AMD EPYC at load 6-7): a step of 8 patches 0.44 s for one model, 0.87 s for DET's two (prr; 0.21 and 0.42 s at 4
# patches, prost_d's 16 steps); 141 steps per epoch over the 6 sites (279 training volumes), so an epoch is 61 s
# (local, fedavg) and 123 s (prr); a validation pass of one model over the 34 validation volumes 3.8 s; a test pass
# over the 68 test volumes 27 s with a compact prediction (sliding window, HD95, the original grid) and up to 270 s
# with an untrained model's noisy one (HD95's surface search: prost_e 4.05 s a volume); the set-up (reading,
# resampling, caching 395 volumes) about 120 s. At 4 rounds x 5 epochs: local or fedavg 120 + 20 x 61 + 24 x 3.8 +
# (4 x 27 + 270) = 1810 s (30 min); prr 120 + 20 x 123 + 48 x 3.8 + (5 x 27 + 270) = 3170 s (53 min). Two runs in
# parallel on 2 cores: prr on one, local then fedavg on the other, so the three end after about 60 min of an
# otherwise idle machine, inside the 90 min budget with a 1.5x margin for the estimate; the 2-D runs of the seed then
# take about 10 min more (the default plan's: prr 550 CPU s, local 280, fedavg 290).
THREED_PROSTATE = TaskPlan(
    rounds=4, local_epochs=5, seeds=1, scale=3.4, methods=THREED_METHODS, ablations=(),
    overrides={"data": {"spacing": [2.0, 2.0, 3.0], "patch_size": [64, 64, 16], "patches_per_volume": 4,
                        "foreground_ratio": 0.5},
               "model": {"width": 0.25}, "batch_size": 2,
               "evaluation": {"sw_overlap": 0.25, "sw_mode": "gaussian", "sw_batch_size": 2},
               "diagnostics": {"bn_reestimation": True},
               "optimizer": REALISTIC_PROSTATE.overrides["optimizer"]},
)
FULL_PROSTATE = TaskPlan(  # the reference's prostate settings (algorithm.md), for a GPU
    rounds=20, local_epochs=5, seeds=2, warmup_rounds=1,
    overrides={"data": {"input_size": 256}, "model": {"width": 1.0}, "batch_size": 8,
               "optimizer": {"name": "sgd", "lr": 1e-3, "momentum": 0.0}},
)
# The 3-D reference-scale plan (`--full-3d`, for a GPU; written, not run): FULL_PROSTATE's sites, rounds, epochs and
# optimizer in 3-D. Spacing: the synthetic sites' median voxel spacing over cases (0.625 mm in-plane, 3.0 mm
# slices), nnU-Net's choice of target spacing, giving 192-384 voxels across the fields of view (120-240 mm) and
# 22-24 slices. Patches of 256 x 256 x 16 (most of a field of view; 16 of the slices, every edge a multiple of 16),
# 2 volumes x 4 patches per step, UNet x1; sliding window as nnU-Net (overlap 0.5, gaussian). One prr training step
# is estimated at 6.5 GiB (medfl.tasks.volumetric.training_batch_memory on the meta device: 2 models x 3.2 GiB of
# activations); data caches and the sliding window come on top.
THREED_FULL_PROSTATE = TaskPlan(
    rounds=20, local_epochs=5, seeds=2, warmup_rounds=1, methods=THREED_METHODS, ablations=(),
    overrides={"data": {"spacing": [0.625, 0.625, 3.0], "patch_size": [256, 256, 16], "patches_per_volume": 4,
                        "foreground_ratio": 0.5},
               "model": {"width": 1.0}, "batch_size": 2,
               "evaluation": {"sw_overlap": 0.5, "sw_mode": "gaussian", "sw_batch_size": 4},
               "optimizer": FULL_PROSTATE.overrides["optimizer"]},
)

PRESETS: dict[str, Preset] = {
    "default": Preset(
        "the realistic federation (`medfl synth --shift realistic`), the 2-core CPU plan: every site >= 200 local "
        "steps per round, 5 local epochs; dermoscopy 32 px slim VGG-16 x0.25, 10 rounds, plain SGD; prostate 64 px "
        "UNet x0.25, 4 rounds, Adam; main methods 3 seeds, ablations 1 seed",
        scale=0.6, device="cpu", shift="realistic",
        tasks={"dermoscopy": REALISTIC_DERMOSCOPY, "prostate": REALISTIC_PROSTATE},
    ),
    "mild": Preset(
        "the mild federation (today's `medfl synth`), the earlier 2-core CPU plan: shipped experiments (32 px slim "
        "VGG-16 x0.25, 64 px UNet x0.5), synthetic scale 0.1, dermoscopy 3 seeds x 20 rounds x 3 epochs, prostate "
        "2 seeds x 10 rounds x 3 epochs",
        scale=0.1, device="cpu",
        tasks={
            "dermoscopy": TaskPlan(rounds=20, local_epochs=3, seeds=3),
            "prostate": TaskPlan(rounds=10, local_epochs=3, seeds=2),
        },
    ),
    "quick": Preset(
        "dermoscopy only, mild federation, 2 seeds, 10 rounds x 3 local epochs (about 30 min on a busy 2-core machine)",
        scale=0.1, device="cpu",
        tasks={"dermoscopy": TaskPlan(rounds=10, local_epochs=3, seeds=2)},
    ),
    "imbalanced": Preset(
        "dermoscopy only, mild federation, 2 seeds, 20 rounds x 3 local epochs, with synth's per-class minimums "
        "lowered so that the reference's rare classes stay rare (derm_b's melanomas); main methods and prr_ce",
        scale=0.1, device="cpu", minimums=(10, 2, 4), ablations=("prr_ce",),
        tasks={"dermoscopy": TaskPlan(rounds=20, local_epochs=3, seeds=2)},
    ),
    "full": Preset(
        "the reference settings (algorithm.md) for a GPU, on the realistic federation: synthetic scale 1 (reference "
        "counts), dermoscopy 128 px slim VGG-16 x1, SGD lr 1e-2, 50 rounds x 5 epochs, warm-up 15; prostate 256 px "
        "UNet x1, lr 1e-3, 20 x 5, warm-up 1",
        scale=1.0, device="auto", shift="realistic",
        tasks={
            "dermoscopy": TaskPlan(
                rounds=50, local_epochs=5, seeds=3, warmup_rounds=15,
                overrides={"data": {"input_size": 128}, "model": {"width": 1.0}, "batch_size": 16,
                           "optimizer": {"name": "sgd", "lr": 1e-2, "momentum": 0.0}},
            ),
            "prostate": FULL_PROSTATE,
        },
    ),
    "threed": Preset(
        "prostate in 2-D and in 3-D on the realistic federation's sites (`medfl synth --shift realistic`, scale 3.4, "
        "the default plan's cases): local, fedavg and prr, 4 rounds x 5 local epochs, Adam; 2-D as the default plan "
        "(64 px slices, UNet x0.25); 3-D at 2 x 2 x 3 mm, 2 volumes x 4 patches of 64 x 64 x 16 per step, UNet x0.25, "
        "sized from a measured epoch to about 1 h for the three 3-D runs on 2 cores; one seed (`--seeds N` adds "
        "seeds), every run of a seed before the next seed's",
        scale=3.4, device="cpu", shift="realistic", seeds_first=True, fresh_processes=True, probe=False,
        tasks={"prostate": replace(REALISTIC_PROSTATE, seeds=1, methods=THREED_METHODS, ablations=()),
               "prostate3d": THREED_PROSTATE},
    ),
    "threed_full": Preset(
        "`--threed` at the reference scale, for a GPU (written, not run): the `--full` prostate plan (synthetic scale "
        "1, 256 px UNet x1, SGD lr 1e-3, 20 rounds x 5 epochs, warm-up 1) in 2-D and in 3-D at 0.625 x 0.625 x 3 mm, "
        "patches of 256 x 256 x 16; local, fedavg and prr, 2 seeds",
        scale=1.0, device="auto", shift="realistic", seeds_first=True, fresh_processes=True, probe=False,
        tasks={"prostate": replace(FULL_PROSTATE, methods=THREED_METHODS, ablations=()),
               "prostate3d": THREED_FULL_PROSTATE},
    ),
}  # fmt: skip
# --smoke: every step of the benchmark (runs of every main method, a variant per task, summaries, the aggregation
# probe, tables and figures) on the fewest images and cases synth allows, narrow networks, 2 rounds of 1 epoch.
# Prostate runs the methods of the 2-D/3-D comparison (the --threed preset's): every main method's code path is the
# same for both tasks (dermoscopy runs them all), and a run costs a few CPU seconds.
SMOKE = Preset(
    "smoke test: tiny mild federation, narrow networks, 2 rounds x 1 epoch, one seed", scale=0.01, device="cpu",
    minimums=(1, 1, 1, 3), sites={"dermoscopy": 2, "prostate": 2},
    tasks={
        "dermoscopy": TaskPlan(rounds=2, local_epochs=1, seeds=1, ablations=("prr_amplitude",),
                               overrides={"model": {"width": 0.125}, "diagnostics": {"bn_reestimation": True}}),
        "prostate": TaskPlan(rounds=2, local_epochs=1, seeds=1, ablations=("prr_bnunet",), methods=THREED_METHODS,
                             overrides={"data": {"input_size": 32}, "model": {"width": 0.125},
                                        "diagnostics": {"bn_reestimation": True}}),
        # One 3-D run (prr: DET, CPA and PFA in 3-D) on the same sites: the 3-D path and the 2-D/3-D table. At
        # 4 x 4 x 6 mm a volume is a few sliding windows of the patch (at 2 x 2 x 3 mm the run took 2 CPU s more).
        "prostate3d": TaskPlan(rounds=2, local_epochs=1, seeds=1, methods=("prr",), ablations=(),
                               overrides={"data": {"spacing": [4.0, 4.0, 6.0], "patch_size": [32, 32, 16],
                                                   "patches_per_volume": 1},
                                          "model": {"width": 0.125}, "batch_size": 1,
                                          "diagnostics": {"bn_reestimation": True}}),
    },
)  # fmt: skip


# ---- planning ----------------------------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, nested mappings key by key."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def site_configs(synth_root: Path, task: str) -> list[str]:
    """The generated site configs of a task, in site order."""
    return [str(path) for path in sorted((synth_root / "site_configs" / task).glob("*.yaml"))]


def experiment_dict(task: str, plan: TaskPlan, label: str, seed: int, synth_root: Path, threads: int,
                    device: str) -> dict[str, Any]:
    """The shipped experiment of `task` with this preset's budget, the method (or variant) `label` and seed;
    nothing else changed."""
    base = yaml.safe_load((EXPERIMENTS / TASKS[task][1]).read_text(encoding="utf-8"))
    method, options = VARIANTS.get(label, (label, {}))
    planned = deep_merge(base, {
        **plan.overrides,
        "sites": site_configs(synth_root, DATA_OF.get(task, task)),
        "method": method, "seed": seed, "rounds": plan.rounds, "local_epochs": plan.local_epochs,
        "cpa": {"warmup_rounds": plan.warmup},
        "device": device, "runtime": {"threads": threads},
        "output_dir": str(synth_root.parent / "runs"),
    })
    # The variant's options last: they are what the variant changes, even where the preset sets the same keys.
    return deep_merge(planned, options)


def plan_jobs(preset: Preset, root: Path, threads: int, device: str) -> list[dict[str, Any]]:
    """Every (task, method, seed) run of the preset, two-model methods first (they take longest); with
    `seeds_first`, every run of a seed before any of the next (then 3-D before 2-D, two-model methods first)."""
    synth_root = root / "synth"
    jobs = []
    for task, plan in preset.tasks.items():
        for label in plan.methods + preset.ablations_of(task):
            seeds = plan.seeds if label in plan.methods else min(preset.ablation_seeds, plan.seeds)
            for seed in range(seeds):
                name = f"{task}-{label}-seed{seed}"
                config_path = root / "configs" / f"{name}.yaml"
                atomic_write_text(config_path, yaml.safe_dump(
                    experiment_dict(task, plan, label, seed, synth_root, threads, device), sort_keys=False))
                jobs.append({"name": name, "task": task, "method": VARIANTS.get(label, (label,))[0], "label": label,
                             "seed": seed, "threads": threads, "config": str(config_path),
                             "run_dir": str(root / "runs" / name), "fresh_process": preset.fresh_processes})
    if preset.seeds_first:
        return sorted(jobs, key=lambda job: (job["seed"], job["task"] != "prostate3d",
                                             not method_spec(job["method"]).two_models))
    return sorted(jobs, key=lambda job: (not method_spec(job["method"]).two_models, job["task"] != "prostate"))


# ---- running (one process per run, so that runs can share the cores) ----------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is missing). Linux carries ru_maxrss
    across exec, so a spawned worker would report its parent's peak; VmHWM is the process's own."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume, or reuse) one experiment with the Coordinator; its wall and process CPU seconds, the CPU
    seconds of its set-up and of each round (from the Coordinator's progress events) and the process's peak RSS
    (the run's own where the job ran in a fresh process, `fresh_process`; else the peak of every run the worker
    ran so far)."""
    import torch

    from medfl.devices import resolve_device
    from medfl.experiment import load_experiment_config
    from medfl.federated.coordinator import Coordinator
    from medfl.tasks import task_for

    torch.set_num_threads(job["threads"])
    config = load_experiment_config(job["config"])
    run_dir = Path(job["run_dir"])
    record = run_dir / "benchmark_job.json"
    saved_config = run_dir / "config.yaml"
    if saved_config.is_file() and yaml.safe_load(saved_config.read_text(encoding="utf-8")) != config.resolved():
        shutil.rmtree(run_dir)  # a run of an earlier preset definition: start again
    summary_path = run_dir / "summary.json"
    if record.is_file() and summary_path.is_file() and json.loads(summary_path.read_text())["finished"]:
        return {**job, **json.loads(record.read_text()), "reused": True}
    resume = (run_dir / "run.json").is_file()  # a started run continues (one that completed no round restarts)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    wall, cpu = time.perf_counter(), time.process_time()
    marks: dict[str, float | None] = {"cpu": cpu, "setup": None}
    rounds_cpu: list[float] = []

    def observe(event: str, info: dict[str, Any]) -> None:
        if event in ("start", "round"):
            now = time.process_time()
            if event == "start":
                marks["setup"] = now - marks["cpu"]
            else:
                rounds_cpu.append(now - marks["cpu"])
            marks["cpu"] = now

    Coordinator(config, run_dir, resolve_device(config.device), progress=observe,
                task=task_for(config.task, config)).run(resume=resume)
    timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "resumed": resume,
              "load_average_1min": load, "setup_cpu_s": marks["setup"], "round_cpu_s": rounds_cpu,
              "peak_rss_mb": peak_rss_mb(), "fresh_process": bool(job.get("fresh_process"))}
    atomic_write_json(record, timing)
    return {**job, **timing, "reused": False}


def load_range(done: list[dict[str, Any]]) -> str:
    """', a-b when its runs started' from the runs' records (older records lack it: empty then)."""
    loads = [d["load_average_1min"] for d in done if d.get("load_average_1min") is not None]
    return f", {min(loads):.1f}-{max(loads):.1f} when its runs started" if loads else ""


def worker_pool(workers: int, fresh: bool = False) -> ProcessPoolExecutor:
    """`workers` spawned processes for runs; `fresh`: a new process for every job."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                               max_tasks_per_child=1 if fresh else None)


def run_all(jobs: list[dict[str, Any]], workers: int, runner=run_job, fresh: bool = False,
            pool: ProcessPoolExecutor | None = None) -> list[dict[str, Any]]:
    """Run the jobs on `workers` processes with `runner` (a module-level function: it is pickled); one line per
    finished run. `fresh`: every job in a new process (its peak memory is then its own, at the cost of a start-up
    per run: importing torch and MONAI again). `pool`: an open worker_pool to run on instead of a new one, left open
    (contest.py's smoke runs both of its stages on one worker: a new process imports torch and MONAI again)."""
    done = []
    start = time.perf_counter()
    with nullcontext(pool) if pool is not None else worker_pool(workers, fresh) as pool:
        futures = {pool.submit(runner, job): job for job in jobs}
        failed = []
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as error:  # one failed run must not hide the others' progress: report it, go on
                failed.append(futures[future]["name"])
                print(f"[{time.perf_counter() - start:6.0f} s] {futures[future]['name']} failed: {error}", flush=True)
                continue
            done.append(result)
            state = "reused" if result["reused"] else f"{result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU"
            print(f"[{time.perf_counter() - start:6.0f} s] {len(done)}/{len(jobs)} {result['name']}: {state}",
                  flush=True)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them")
    return done


# ---- reading the runs -------------------------------------------------------------------------------------


def train_counts(run_config: dict[str, Any]) -> dict[str, list[int]]:
    """Per-site training class counts, read with medfl's own reader and the run's data settings."""
    from medfl.config import DataSettings, load_site_config
    from medfl.data import load_site
    from medfl.tasks import task_for

    settings = DataSettings(**run_config["data"])
    counts = {}
    for path in run_config["sites"]:
        site = load_site_config(path)
        counts[site.name] = load_site(site, settings, task=task_for(site.task)).class_counts("train")
    return counts


def label_of(run) -> str:
    """The method or ablation variant a run was planned as: its folder is named <task>-<label>-seed<seed>."""
    return run.path.name.partition("-")[2].rsplit("-seed", 1)[0]


def communication_dips(run, site: str) -> float:
    """Sum over rounds of the drop of the used model's validation score across a communication (epoch E of
    round t-1 to epoch 0 of round t); only meaningful for one-model methods, whose model is overwritten."""
    values = {(row["round"], row["epoch"]): row["value"] for row in run.metrics
              if (row["site"], row["model"], row["split"], row["metric"]) == (site, run.used_model, "val", run.metric)}
    epochs = run.local_epochs
    drops = [max(0.0, values[(t - 1, epochs)] - values[(t, 0)])
             for t in range(1, 1 + max(r for r, _ in values)) if (t - 1, epochs) in values and (t, 0) in values]
    return float(sum(drops))


def site_values(run, metrics: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Per site: the requested summary values, plus communication dips for one-model communicating methods.

    The section "reference" reads the reference protocol's test scores (summary.json's reference_protocol)."""
    values = {}
    reference = run.summary.get("reference_protocol", {}).get("sites", {})
    for site, entry in run.summary["sites"].items():
        row = {}
        for name, (section, key) in metrics.items():
            if section == "reference":
                source = reference.get(site, {}).get("test", {})
            else:
                source = entry.get(section, {}) if section else entry
            value = source.get(key) if isinstance(source, dict) else None
            row[name] = math.nan if value is None else float(value)
        if not run.communicates:
            row["retrogress"] = row["recovery"] = row["retrogress_bn"] = math.nan
        row["communication_dips"] = (
            communication_dips(run, site) if run.communicates and run.used_model == run.receiving_model else math.nan
        )
        values[site] = row
    return values


def det_shares(run) -> dict[str, float]:
    """Share of local epochs spent in each DET state (every site, every round)."""
    states = Counter(row["state"] for row in run.det if row.get("state"))
    total = sum(states.values())
    return {state: states[state] / total for state in ("recover", "exchange", "sublimate")} if total else {}


def task_metrics(task: str, rarest: str | None) -> dict[str, tuple[str, str]]:
    """Reported values: name -> (summary section, key); the section '' is the site entry itself, "reference" the
    reference protocol's scores (model right after communication, one round for all sites, rounds >= 0.8 T);
    "test" is the per-site fine-tuned protocol (after local training, each site's own validation choice)."""
    dynamics = {"retrogress": ("", "retrogress"), "recovery": ("", "recovery"),
                "retrogress_bn": ("", "retrogress_bn_reestimated"), "curve_dips": ("", "curve_dips"),
                "det_changes": ("", "det_changes_per_round"), "det_fallbacks": ("", "det_fallbacks_per_round")}
    if task == "dermoscopy":
        return {"ref_macro_f1": ("reference", "macro_f1"), f"ref_f1_{rarest}": ("reference", f"f1_{rarest}"),
                "ref_auc": ("reference", "auc"),
                "macro_f1": ("test", "macro_f1"), f"f1_{rarest}": ("test", f"f1_{rarest}"),
                "auc": ("test", "auc"), "accuracy": ("test", "accuracy"),
                "macro_f1_last_round": ("test_last_round", "macro_f1"), **dynamics}
    # dice and hd95 are scored on the grid the run scores on (2-D: the slices at input_size; 3-D: data.spacing);
    # the *_original ones on each test case's own voxel grid, the same for 2-D and 3-D (runs from before medfl
    # scored there lack them: NaN).
    return {"ref_dice": ("reference", "dice"), "ref_hd95": ("reference", "hd95"),
            "ref_dice_original": ("reference", "dice_original"), "ref_hd95_original": ("reference", "hd95_original"),
            "dice": ("test", "dice"), "hd95": ("test", "hd95"), "hd95_missing": ("test", "hd95_missing"),
            "dice_original": ("test", "dice_original"), "hd95_original": ("test", "hd95_original"),
            "hd95_original_missing": ("test", "hd95_original_missing"),
            "dice_last_round": ("test_last_round", "dice"), **dynamics}


def spread(values: list[float]) -> dict[str, Any]:
    """Mean and sample sd of the defined values (sd None with fewer than two)."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(defined), "sd": statistics.stdev(defined) if len(defined) > 1 else None,
            "n": len(defined)}


def nanmean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return statistics.fmean(defined) if defined else math.nan


def run_cost(run) -> dict[str, float]:
    """What a run cost: mean wall seconds per round (its timing.csv), mean process CPU seconds per round and peak
    RSS (the benchmark's record of the run, benchmark_job.json; NaN in records written before they were kept)."""
    from medfl.runfolder import RunFolder

    record_path = run.path / "benchmark_job.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    rounds = RunFolder(run.path).timing()
    rounds_cpu = record.get("round_cpu_s") or []
    return {"round_wall_s": statistics.fmean(float(r["round_s"]) for r in rounds) if rounds else math.nan,
            "round_cpu_s": statistics.fmean(rounds_cpu) if rounds_cpu else math.nan,
            "run_wall_s": float(record.get("wall_s", math.nan)),
            "peak_rss_mb": float(record.get("peak_rss_mb") or math.nan)}


def summarise_task(task: str, runs: list, scratch: Path, probe: bool = True) -> dict[str, Any]:
    """Per method: per-site and mean-over-sites values across seeds, what the runs cost, DET shares, prr's
    paired differences, and (`probe`, 2-D tasks) the aggregation probe on prr's first seed."""
    counts, totals, classes, rarest = {}, [], None, None
    if task == "dermoscopy":
        counts = train_counts(runs[0].config)
        totals = [sum(column) for column in zip(*counts.values(), strict=True)]
        classes = runs[0].config["data"]["classes"]
        rarest = classes[totals.index(min(totals))]
    metrics = task_metrics(task, rarest)
    names = list(metrics) + ["communication_dips"]
    by_method: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    costs: dict[str, list[dict[str, float]]] = {}
    shares: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        by_method.setdefault(label_of(run), {})[run.seed] = site_values(run, metrics)
        costs.setdefault(label_of(run), []).append(run_cost(run))
        if det_shares(run):
            shares.setdefault(label_of(run), []).append(det_shares(run))
    sites = list(runs[0].summary["sites"])
    methods = {}
    for method, seeds in by_method.items():
        site_means = {seed: {n: nanmean([values[s][n] for s in sites]) for n in names} for seed, values in seeds.items()}
        methods[method] = {
            "seeds": sorted(seeds),
            "mean": {n: spread([site_means[seed][n] for seed in seeds]) for n in names},
            "sites": {s: {n: spread([seeds[seed][s][n] for seed in seeds]) for n in names} for s in sites},
            "per_seed": {str(seed): {"mean": site_means[seed], "sites": values} for seed, values in seeds.items()},
            "cost": {n: spread([c[n] for c in costs[method]]) for n in costs[method][0]},
            "det_states": {k: statistics.fmean(d[k] for d in shares[method]) for k in shares[method][0]}
            if method in shares else None,
        }
    headline = "macro_f1" if task == "dermoscopy" else "dice"
    rare = [f"f1_{rarest}"] if rarest else []
    compared = [f"ref_{headline}"] + [f"ref_{n}" for n in rare] + [headline] + rare + ["curve_dips"]
    paired = {}
    for other in ("fedavg", "fedbn", "local"):
        if "prr" in by_method and other in by_method:
            common = sorted(set(by_method["prr"]) & set(by_method[other]))
            paired[f"prr_minus_{other}"] = {
                n: spread([methods["prr"]["per_seed"][str(s)]["mean"][n] - methods[other]["per_seed"][str(s)]["mean"][n]
                           for s in common]) for n in compared
            }
    probe_run = next((run for run in runs if label_of(run) == "prr"), None)
    # The probe scores 2-D slices (evaluate_model on batches of slices); a 3-D run's deputies are not probed.
    probed = probe and probe_run is not None and probe_run.config["data"].get("dims", 2) == 2
    probe = aggregation_probe(probe_run, scratch / task) if probed else None
    setting = {key: runs[0].config.get(key) for key in ("data", "model", "batch_size", "evaluation")}
    return {"sites": sites, "train_counts": counts, "class_totals": totals, "classes": classes, "rarest_class": rarest,
            "metrics": names, "methods": methods, "paired_differences": paired, "aggregation_probe": probe,
            "setting": setting}


def _circular_signals(signals: list, ratio: float, weights) -> list:
    """aggregation.py's reference-style PFA on one matrix, with the circular mean of the sites' phases (the angle
    of the weighted sum of unit phasors) instead of the linear mean of wrapped angles."""
    import numpy as np
    from aggregation import _shifted_polar

    polar = [_shifted_polar(signal) for signal in signals]
    amplitude = sum(w * a for w, (a, _) in zip(weights, polar, strict=True))
    phase = np.angle(sum(w * np.exp(1j * p) for w, (_, p) in zip(weights, polar, strict=True)))
    box = tuple(slice(n // 2 - int(n * ratio / 2), n // 2 + int(n * ratio / 2)) for n in signals[0].shape)
    outputs = []
    for own_amplitude, own_phase in polar:
        own_amplitude[box], own_phase[box] = amplitude[box], phase[box]
        rebuilt = np.fft.ifftshift(own_amplitude) * np.exp(1j * np.fft.ifftshift(own_phase))
        outputs.append(np.real(np.fft.ifftn(rebuilt)))
    return outputs


def circular_pfa_strategy(config, model):
    """The run's PFA strategy, its phases averaged on the circle (a diagnostic rule, not a medfl option)."""
    import aggregation
    import numpy as np

    from medfl.federated.params import parameter_roles
    from medfl.federated.pfa import pfa_ratio
    from medfl.federated.rounds import strategy_options
    from medfl.federated.server import PFAStrategy

    class CircularPFA(PFAStrategy):
        def _merge_weights(self, round_, updates):
            states = {site: update.weights for site, update in updates.items()}
            weights = np.full(len(states), 1.0 / len(states))
            linear = aggregation._reference_signals
            aggregation._reference_signals = _circular_signals
            try:
                return aggregation.reference_pfa(states, self.roles, pfa_ratio(round_, self.rounds, self.start,
                                                                                self.end), weights)
            finally:
                aggregation._reference_signals = linear

    return CircularPFA(parameter_roles(model), config.rounds, **strategy_options(config))


def aggregation_probe(run, scratch: Path) -> dict[str, Any]:
    """Retrogress of the deputies under other server rules, on the same uploads of one PFA run.

    For every round that aggregated, each site's uploaded D (sites/<site>/models/round_XXXX.pt) is merged
    again by the run's own strategy (which must reproduce the run's retrogress.csv), by PFA sharing the
    amplitude only, by PFA with a circular mean of the phases (uniform site weights), by FedBN's and by
    FedAvg's average; each site's received D is scored on its validation split. This separates what PFA
    does to D from what any averaging does.
    """
    import torch
    from monai.data import DataLoader

    from medfl.experiment import ExperimentConfig
    from medfl.federated.evaluation import evaluate_model
    from medfl.federated.rounds import strategy_options
    from medfl.federated.server import SiteUpdate, build_strategy
    from medfl.federated.site import Site
    from medfl.tasks import task_for

    config = ExperimentConfig.model_validate(run.config)
    sites = {}
    for site_config in config.load_sites():
        site = Site(site_config, config, scratch, torch.device("cpu"), task=task_for(config.task))
        site.initialize()
        sites[site.name] = site
    model = next(iter(sites.values())).models["D"]
    base = {"prototype_mode": config.cpa.prototype_mode, "seed": config.seed}
    averaging = {**base, "weighting": config.baselines.fedavg_weighting}
    rules = {
        "pfa (as run)": build_strategy(config.method, model, config.rounds, **strategy_options(config)),
        "pfa, amplitude only": build_strategy(config.method, model, config.rounds,
                                              **{**strategy_options(config), "share_phase": False}),
        "pfa, circular phase mean": circular_pfa_strategy(config, model),
        "fedbn average": build_strategy("fedbn", model, config.rounds, **averaging),
        "fedavg average": build_strategy("fedavg", model, config.rounds, **averaging),
    }

    def phi(site: Site, state: dict[str, Any]) -> float:
        network = site.models["D"]
        network.load_state_dict(state)
        spacing = site.data.geometry
        size = config.data.input_size
        loader = DataLoader(site.datasets["val"], batch_size=max(config.batch_size, 32), shuffle=False)
        value = evaluate_model(network, loader, site.task, site.classes, torch.device("cpu"),
                               lambda case: spacing[case].slice_volume_spacing(size) if case in spacing else None)
        return float(value.get(run.metric, math.nan))

    logged = {(row["site"], row["round"]): row for row in run.retrogress}
    rows: dict[str, list[tuple[float, float]]] = {rule: [] for rule in rules}
    replay_error = 0.0
    for round_ in range(config.rounds - 1):
        uploads = {
            name: torch.load(run.path / "sites" / name / "models" / f"round_{round_:04d}.pt", map_location="cpu",
                             weights_only=True)["models"]["D"]
            for name in sites
        }
        updates = {name: SiteUpdate(weights=uploads[name], num_samples=len(site.datasets["train"]))
                   for name, site in sites.items()}
        before = {name: phi(site, uploads[name]) for name, site in sites.items()}
        for rule, strategy in rules.items():
            received = strategy.aggregate(round_, updates).weights
            for name, site in sites.items():
                after = phi(site, {**uploads[name], **received[name]})
                rows[rule].append((before[name], after))
                if rule == "pfa (as run)" and (name, round_ + 1) in logged:
                    replay_error = max(replay_error, abs(after - logged[(name, round_ + 1)]["after"]))
    summary = {}
    for rule, pairs in rows.items():
        drops = [b - a for b, a in pairs]
        summary[rule] = {"before": statistics.fmean(b for b, _ in pairs), "after": statistics.fmean(a for _, a in pairs),
                         "retrogress": statistics.fmean(drops), "share_drops_over_0.1": sum(d > 0.1 for d in drops) / len(drops)}
    return {"run": run.path.name, "rules": summary, "replay_max_abs_error": replay_error,
            "pairs": len(rows["pfa (as run)"])}


# ---- output ----------------------------------------------------------------------------------------------


LABELS = {"macro_f1": "macro-F1", "auc": "AUC", "accuracy": "accuracy", "dice": "Dice", "hd95": "HD95 (mm)",
          "hd95_missing": "cases w/o HD95", "dice_original": "Dice, original grid",
          "hd95_original": "HD95 (mm), original grid", "hd95_original_missing": "cases w/o HD95, original grid",
          "macro_f1_last_round": "macro-F1 last round",
          "dice_last_round": "Dice last round", "retrogress": "retrogress (receiving)",
          "retrogress_bn": "retrogress after BN re-estimation", "recovery": "recovery (receiving)",
          "curve_dips": "curve dips (used)", "communication_dips": "of which at communication",
          "det_changes": "DET state changes / round", "det_fallbacks": "DET fallbacks / round"}
DYNAMICS = ("retrogress", "retrogress_bn", "recovery", "curve_dips", "communication_dips", "det_changes",
            "det_fallbacks")


def cell(entry: dict[str, Any], digits: int = 3) -> str:
    if entry["mean"] is None:
        return "–"
    text = f"{entry['mean']:.{digits}f}"
    return text + (f" ± {entry['sd']:.{digits}f}" if entry["sd"] is not None else "")


def label(name: str) -> str:
    if name.startswith("ref_"):
        return label(name.removeprefix("ref_"))
    return LABELS.get(name, name.replace("f1_", "F1 ") + (" (rarest)" if name.startswith("f1_") else ""))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ordered_methods(result: dict[str, Any]) -> list[str]:
    known = MAIN_METHODS + ABLATIONS + BATCHNORM_UNET
    return [m for m in known if m in result["methods"]] + sorted(set(result["methods"]) - set(known))


def quality_table(result: dict[str, Any], names: list[str], methods: list[str], fine_tuned: bool) -> str:
    return table(["method", "seeds"] + [label(n) for n in names],
                 [[FINE_TUNED.get(m, m) if fine_tuned else m, str(len(result["methods"][m]["seeds"]))]
                  + [cell(result["methods"][m]["mean"][n], 2 if n.endswith(("hd95", "hd95_original")) else 3)
                     for n in names]
                  for m in methods])


def per_site_table(result: dict[str, Any], name: str, methods: list[str], fine_tuned: bool) -> str:
    return table(["method"] + result["sites"],
                 [[FINE_TUNED.get(m, m) if fine_tuned else m]
                  + [cell(result["methods"][m]["sites"][s][name]) for s in result["sites"]] for m in methods])


def task_markdown(task: str, result: dict[str, Any], plan: dict[str, Any]) -> str:
    methods = ordered_methods(result)
    reference = [n for n in result["metrics"] if n.startswith("ref_")]
    fine_tuned = [n for n in result["metrics"] if not n.startswith("ref_") and n not in DYNAMICS]
    headline = fine_tuned[0]
    counts = ", ".join(f"{s} {'/'.join(map(str, c))}" for s, c in result["train_counts"].items())
    lines = [f"## {task}", "",
             f"{plan['rounds']} rounds x {plan['local_epochs']} local epochs, CPA warm-up {plan['warmup']} rounds; "
             f"seeds: main methods {plan['seeds']}, ablations {plan['ablation_seeds']}. "
             + ("Training counts per site" if task == "dermoscopy" else "Sites")
             + (f" ({'/'.join(result['classes'])}): {counts}; rarest class over the federation: "
                f"**{result['rarest_class']}** (totals {'/'.join(map(str, result['class_totals']))})."
                if task == "dermoscopy" else f": {len(result['sites'])} sites (cases split 70/10/20)."),
             "", "### Reference protocol: the model right after communication, one round for all sites", "",
             "The model each site would use right after a communication (FedAvg, FedBN: the received model; "
             "two-model methods: P; local: its own), scored on test at the one round, among rounds >= 0.8 T, whose "
             "mean validation score over sites is best. Mean over sites; mean ± sd across seeds.", "",
             quality_table(result, reference, methods, fine_tuned=False),
             "", "### Per-site fine-tuned protocol: after local training, each site's own validation choice", "",
             "The model each site uses after its local epochs, at the round its own validation score selected. For "
             "FedAvg and FedBN this is FedAvg/FedBN plus local fine-tuning (-FT), a stronger personalised baseline.",
             "", quality_table(result, fine_tuned, methods, fine_tuned=True),
             "", f"### {label(headline)} per site (reference protocol, then per-site fine-tuned)", "",
             per_site_table(result, f"ref_{headline}", methods, fine_tuned=False), "",
             per_site_table(result, headline, methods, fine_tuned=True)]
    if task == "dermoscopy":
        rare = f"f1_{result['rarest_class']}"
        lines += ["", f"### {label(rare)} per site (reference protocol)", "",
                  per_site_table(result, f"ref_{rare}", methods, fine_tuned=False)]
    lines += ["", "### Retrogress, recovery, curve dips and DET (validation " + ("macro-F1" if task == "dermoscopy" else "Dice")
              + ", mean over sites and rounds)", "",
              "Retrogress and recovery are those of the model that receives the server's weights (D for two-model "
              "methods, the single model otherwise); 'after BN re-estimation' is the retrogress of the same received "
              "model once its BatchNorm statistics are re-estimated on the site's training data (no weight change): "
              "the part of a collapse that it removes is normalisation statistics. Curve dips are those of the model "
              "each site uses (P or the single model): the sum of its drops from epoch to epoch over the whole run. "
              "Communication dips are shown only where the used model is the one overwritten; P is never overwritten, "
              "so its part at communication is zero by construction and is not a measurement. DET state changes count "
              "changes between consecutive local epochs of a round (the first epoch is always Recover); fallbacks "
              "count changes to an earlier state, a sign that phi is too noisy to steer DET.", "",
              table(["method"] + [label(n) for n in DYNAMICS],
                    [[m] + [cell(result["methods"][m]["mean"][n]) for n in DYNAMICS] for m in methods])]
    det = [m for m in methods if result["methods"][m]["det_states"]]
    if det:
        lines += ["", "### DET states (share of local epochs, all sites and rounds)", "",
                  table(["method", "recover", "exchange", "sublimate"],
                        [[m] + [f"{result['methods'][m]['det_states'].get(k, 0):.2f}"
                                for k in ("recover", "exchange", "sublimate")] for m in det])]
    probe = result["aggregation_probe"]
    if probe:
        lines += ["", f"### Retrogress of D by server rule, on the same uploads ({probe['run']}, {probe['pairs']} "
                  "site-rounds)", "",
                  "Each round's uploaded deputies merged again by each rule; validation score of the D each site would "
                  f"receive. Replaying the run's own rule reproduces its logged values to {probe['replay_max_abs_error']:.1e}.",
                  "", table(["rule", "before", "after", "retrogress", "share of drops > 0.1"],
                            [[rule, f"{v['before']:.3f}", f"{v['after']:.3f}", f"{v['retrogress']:.3f}",
                              f"{v['share_drops_over_0.1']:.2f}"] for rule, v in probe["rules"].items()])]
    if result["paired_differences"]:
        lines += ["", "### prr against fedavg, fedbn and local (paired by seed: mean ± sd of the differences)", "",
                  "Reference-protocol scores first (prefix ref), then the per-site fine-tuned ones (against -FT).", ""]
        for name, diffs in result["paired_differences"].items():
            parts = ", ".join(f"{'ref ' if n.startswith('ref_') else ''}{label(n)} {cell(d, 3)}" for n, d in diffs.items())
            lines.append(f"- {name.replace('_minus_', ' - ')}: {parts}")
    return "\n".join(lines)


def missing_total(result: dict[str, Any], method: str, name: str) -> dict[str, Any]:
    """Test cases without an HD95 (no prostate predicted, or none in the mask), summed over sites; spread across
    seeds."""
    per_seed = result["methods"][method]["per_seed"].values()
    return spread([sum(v[name] for v in entry["sites"].values()) for entry in per_seed])


def setting_text(result: dict[str, Any]) -> str:
    """The network and data grid of a task's runs, from its first run's resolved config."""
    data, model, window = result["setting"]["data"], result["setting"]["model"], result["setting"]["evaluation"]
    network = f"UNet x{model['width']:g}, batch {result['setting']['batch_size']}"
    if data.get("dims", 2) == 2:
        return f"2-D: axial slices at {data['input_size']} px, {network} slices"
    return (f"3-D: volumes at {' x '.join(f'{v:g}' for v in data['spacing'])} mm, patches of "
            f"{' x '.join(map(str, data['patch_size']))} voxels, {data['patches_per_volume']} per volume "
            f"({data['foreground_ratio']:g} on prostate), {network} volumes; sliding window overlap "
            f"{window['sw_overlap']:g}, {window['sw_mode']}")


def dims_markdown(two: dict[str, Any], three: dict[str, Any], plans: dict[str, dict[str, Any]],
                  fresh: bool) -> str:
    """2-D against 3-D, method by method, on the same test cases: Dice and HD95 on each case's own voxel grid
    (the only grid the two share), the resampled Dice each run selects on, and what a round costs."""
    methods = [m for m in MAIN_METHODS if m in two["methods"] or m in three["methods"]]

    def pair(value, digits: int) -> list[str]:
        """Per method, "2-D / 3-D" of value(result, method), a spread across seeds."""
        return [" / ".join(cell(value(r, m), digits) if m in r["methods"] else "–" for r in (two, three))
                for m in methods]

    def mean(name: str):
        return lambda result, method: result["methods"][method]["mean"][name]

    def cost(name: str):
        return lambda result, method: result["methods"][method]["cost"][name]

    columns = {
        "seeds": [" / ".join(str(len(r["methods"][m]["seeds"])) if m in r["methods"] else "0" for r in (two, three))
                  for m in methods],
        "Dice, original grid": pair(mean("dice_original"), 3),
        "HD95 (mm), original grid": pair(mean("hd95_original"), 2),
        "cases w/o HD95, original grid": pair(lambda r, m: missing_total(r, m, "hd95_original_missing"), 1),
        "Dice, original grid, reference protocol": pair(mean("ref_dice_original"), 3),
        "Dice, resampled grid": pair(mean("dice"), 3),
        "s per round (wall)": pair(cost("round_wall_s"), 0),
        "CPU s per round": pair(cost("round_cpu_s"), 0),
        "peak RSS (MB)": pair(cost("peak_rss_mb"), 0),
    }
    rows = [[FINE_TUNED.get(m, m)] + [values[i] for values in columns.values()] for i, m in enumerate(methods)]
    plan_text = "; ".join(f"{'2-D' if task == 'prostate' else '3-D'}: {plans[task]['rounds']} rounds x "
                          f"{plans[task]['local_epochs']} local epochs" for task in ("prostate", "prostate3d"))
    memory = ("each run in a fresh process, so the peak is the run's own" if fresh else
              "runs shared worker processes, so a peak is the largest of the runs its worker had run")
    return "\n".join([
        "## prostate, 2-D against 3-D on the same test cases", "",
        f"{setting_text(two)}. {setting_text(three)}. {plan_text}. Each cell is 2-D / 3-D, mean over sites, mean ± "
        "sd across seeds. Scores are the per-site fine-tuned protocol (after local training, each site's own "
        "validation choice; fedavg is then fedavg-FT) unless the column says otherwise. The original grid is each "
        "test case's own voxel grid (the 2-D slices' logits upsampled to the original in-plane size, the 3-D "
        "prediction taken back through the inverse of the resampling), scored against the mask as read: the same "
        "cases, voxels and spacing for both; HD95 in mm, averaged over the cases that have one, the cases without "
        "one summed over sites. The resampled Dice is the one each run selects on (2-D: slices at the input size; "
        "3-D: the resampled volume), for continuity with the other tables. Time per round: wall seconds from the "
        f"run's timing.csv, process CPU seconds from the benchmark's record; peak RSS: {memory}.", "",
        table(["method"] + list(columns), rows)])


def bar_figure(results: dict[str, Any], path: Path) -> None:
    """Mean-over-sites test score per method with the spread across seeds, one panel per reported score."""
    from matplotlib.figure import Figure

    from medfl.report.plots import save_png

    panels = []
    for task, result in results.items():
        headline = "macro_f1" if task == "dermoscopy" else "dice"
        panels += [(task, f"ref_{headline}", "reference protocol"), (task, headline, "per-site fine-tuned")]
        if task == "dermoscopy":
            panels.append((task, f"ref_f1_{result['rarest_class']}", "reference protocol"))
        panels.append((task, "curve_dips", ""))
    figure = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    for axis, (task, name, protocol) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        methods = ordered_methods(results[task])
        entries = [results[task]["methods"][m]["mean"][name] for m in methods]
        means = [e["mean"] if e["mean"] is not None else math.nan for e in entries]
        errors = [e["sd"] or 0.0 for e in entries]
        colours = ["C3" if m == "prr" else "C0" if m in MAIN_METHODS else "0.6" for m in methods]
        axis.bar(range(len(methods)), means, yerr=errors, capsize=3, color=colours)
        names = [FINE_TUNED.get(m, m) if protocol == "per-site fine-tuned" else m for m in methods]
        axis.set_xticks(range(len(methods)), names, rotation=45, ha="right")
        axis.set_title(f"{task}: {label(name)}" + (f"\n{protocol}" if protocol else ""), fontsize=10)
    save_png(figure, path)


def curve_figures(task_runs: dict[str, list], stem: Path) -> list[Path]:
    """Per task, validation curves of fedavg, fedbn and prr per site (mean over seeds), communications dotted."""
    from medfl.report.plots import save_png, validation_curves
    from medfl.report.runs import group_runs, site_names

    written = []
    for task, runs in task_runs.items():
        chosen = [run for run in runs if label_of(run) in ("fedavg", "fedbn", "prr")]
        if chosen:
            groups = group_runs(chosen)
            path = with_suffix(stem, f".{task}.curves.png")
            written.append(save_png(validation_curves(groups, site_names(groups), chosen[0].metric), path))
    return written


def with_suffix(stem: Path, suffix: str) -> Path:
    """`stem` plus a suffix; unlike Path.with_suffix it keeps dots in the stem (quality.quick -> quality.quick.md)."""
    return stem.parent / f"{stem.name}{suffix}"


def write_outputs(stem: Path, preset_name: str, preset: Preset, results: dict[str, Any], task_runs: dict[str, list],
                  info: dict[str, Any], command: str) -> None:
    plans = {task: {**asdict(plan), "warmup": plan.warmup, "ablation_seeds": preset.ablation_seeds}
             for task, plan in preset.tasks.items()}
    atomic_write_json(with_suffix(stem, ".json"), {"preset": preset_name, "description": preset.description,
                                                  "scale": preset.scale, "plans": plans, "machine": info,
                                                  "command": command, "results": results})
    timing = info["benchmark"]
    header = [
        f"# Quality: methods and ablations on synthetic federations (preset `{preset_name}`)", "",
        f"`{command}`", "",
        f"{preset.description}. Synthetic data: {preset.data_text()}, data seed 0, "
        "70/10/20 split; every method runs the shipped experiment config with the same data, network, budget "
        "and seeds, only `method` and `seed` differ.", "",
        f"Machine: {info['cpu']}, {info['cpu_cores']} cores, device {info['device']}, {timing['workers']} runs "
        f"in parallel with {timing['threads']} torch thread(s) each; load average {info.get('load_average_1min')} "
        f"when this invocation started{timing['run_loads']}. This invocation took {timing['wall_s'] / 60:.1f} min, reusing {timing['reused']} of "
        f"{timing['runs']} runs from an earlier one; over all runs, where they ran: wall time summed "
        f"{timing['run_wall_s'] / 60:.1f} min, process CPU time summed {timing['cpu_s'] / 60:.1f} min.", "",
        "Test scores are those of the model each site uses, at the round its validation score selected; "
        "`medfl report benchmarks/results/tmp/quality/<preset>/runs/<run>...` gives the full report of any runs.",
    ]
    body = [task_markdown(task, result, plans[task]) for task, result in results.items()]
    if "prostate" in results and "prostate3d" in results:
        body.insert(0, dims_markdown(results["prostate"], results["prostate3d"], plans, preset.fresh_processes))
    atomic_write_text(with_suffix(stem, ".md"), "\n".join(header) + "\n\n" + "\n\n".join(body) + "\n")
    bar_figure(results, with_suffix(stem, ".png"))
    curve_figures(task_runs, stem)


def reproduce(names: list[str], jobs: list[dict[str, Any]], committed_path: Path, workers: int) -> int:
    """Rerun the named runs from scratch and compare their per-site values with the committed results, exactly."""
    from medfl.report.runs import load_run

    committed = json.loads(committed_path.read_text(encoding="utf-8"))["results"]
    chosen = [job for job in jobs if job["name"] in names]
    unknown = sorted(set(names) - {job["name"] for job in chosen})
    if unknown:
        print(f"unknown run(s) {', '.join(unknown)}; runs of this preset: {', '.join(j['name'] for j in jobs)}")
        return 2
    for job in chosen:
        shutil.rmtree(job["run_dir"], ignore_errors=True)
    run_all(chosen, workers)
    differences = 0
    for job in chosen:
        run = load_run(job["run_dir"])
        result = committed[job["task"]]
        metrics = {**task_metrics(job["task"], result["rarest_class"])}
        fresh = site_values(run, metrics)
        saved = result["methods"][job["label"]]["per_seed"][str(job["seed"])]["sites"]
        for site, values in saved.items():
            for name, value in values.items():
                new = fresh[site].get(name, math.nan)
                same = (value is None and math.isnan(new)) or (value is not None and value == new) or (
                    isinstance(value, float) and math.isnan(value) and math.isnan(new))
                if not same:
                    differences += 1
                    print(f"{job['name']} {site} {name}: committed {value!r}, rerun {new!r}")
        print(f"{job['name']}: {'identical' if not differences else f'{differences} differences'} "
              f"({sum(len(v) for v in saved.values())} values compared)")
    return 1 if differences else 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spawned runs inherit it: medfl.environment says why
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="dermoscopy only, 2 seeds, 10 rounds x 3 epochs (~30 min)")
    group.add_argument("--imbalanced", action="store_true",
                       help="dermoscopy with the reference's rare classes kept rare, 2 seeds (~20 min)")
    group.add_argument("--full", action="store_true", help="the reference settings, for a GPU machine")
    group.add_argument("--threed", action="store_true",
                       help="prostate in 2-D and 3-D on the same realistic sites: local, fedavg, prr, one seed "
                            "(about 1 h for the 3-D runs, 1.3 h for all six, on 2 cores: benchmarks/README.md)")
    group.add_argument("--full-3d", action="store_true",
                       help="--threed at the reference scale, for a GPU machine (results quality.threed_full.*)")
    group.add_argument("--mild", action="store_true", help="the earlier plan on the mild federation")
    group.add_argument("--smoke", action="store_true",
                       help="every step on tiny data, one worker; runs and results go to a temporary folder that is "
                            "removed")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (default 2: one per core)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds of the main methods (default: the preset's); finished runs are reused, so "
                             "rerunning with more seeds adds only the new seeds' runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the preset's device")
    parser.add_argument("--root", type=Path, default=RESULTS / "tmp" / "quality", help="where runs are kept")
    parser.add_argument("--output", type=Path, default=None, help="path stem of the results")
    parser.add_argument("--only", nargs="+", metavar="RUN",
                        help="rerun only these runs (e.g. dermoscopy-prr-seed0) and compare every per-site value "
                             "with the committed results; exit 1 on any difference")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            args.root, args.output, args.workers = Path(tmp) / "runs", Path(tmp) / "quality.smoke", 1
            return benchmark(args, "smoke", SMOKE, argv)
    preset_name = next((name for name in ("quick", "imbalanced", "full", "mild", "threed", "full_3d")
                        if getattr(args, name)), "default")
    preset_name = {"full_3d": "threed_full"}.get(preset_name, preset_name)
    return benchmark(args, preset_name, with_seeds(PRESETS[preset_name], args.seeds), argv)


def with_seeds(preset: Preset, seeds: int | None) -> Preset:
    """The preset with `seeds` seeds for every task's main methods (None: as planned)."""
    if seeds is None:
        return preset
    if seeds < 1:
        raise SystemExit("--seeds: at least 1")
    return replace(preset, tasks={task: replace(plan, seeds=seeds) for task, plan in preset.tasks.items()})


def benchmark(args: argparse.Namespace, preset_name: str, preset: Preset, argv: list[str] | None) -> int:
    """Generate the data, run (or reuse) every run of the preset, write the results (or, --only, compare)."""
    device = args.device or preset.device
    root = args.root.resolve() / preset_name
    stem = args.output or RESULTS / ("quality" if preset_name == "default" else f"quality.{preset_name}")
    sys.path.insert(0, str(BENCHMARKS))
    from aggregation import machine, resolve_device

    from medfl.report.runs import load_run
    from medfl.synth import generate

    info = machine(resolve_device(device))
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    start = time.perf_counter()
    for arguments in preset.data_sets():
        generate(root / "synth", **arguments)
    jobs = plan_jobs(preset, root, args.threads, device)
    if args.only:
        return reproduce(args.only, jobs, with_suffix(stem, ".json"), args.workers)
    print(f"preset {preset_name}: {len(jobs)} runs on {args.workers} workers", flush=True)
    done = run_all(jobs, args.workers, fresh=preset.fresh_processes)
    info["benchmark"] = {"wall_s": time.perf_counter() - start, "cpu_s": sum(d["cpu_s"] for d in done),
                         "workers": args.workers, "threads": args.threads,
                         "reused": sum(d["reused"] for d in done), "runs": len(done),
                         "run_wall_s": sum(d["wall_s"] for d in done),
                         "run_loads": load_range(done),
                         "per_run": {d["name"]: {"wall_s": d["wall_s"], "cpu_s": d["cpu_s"],
                                                 "peak_rss_mb": d.get("peak_rss_mb")} for d in done}}
    task_runs = {task: [load_run(job["run_dir"]) for job in jobs if job["task"] == task] for task in preset.tasks}
    results = {task: summarise_task(task, runs, root / "probe", probe=preset.probe) for task, runs in task_runs.items()}
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_outputs(stem, preset_name, preset, results, task_runs, info, command.strip())
    print(with_suffix(stem, ".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
