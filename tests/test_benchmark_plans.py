"""The quality benchmark's plans: every variant run really differs from its method's run by its own options.

A variant (prr_amplitude, local_sgd, the BatchNorm UNet, ...) is the shipped experiment with the preset's budget
and the variant's options; a preset override that touched the same keys once silently replaced the variant's
options (local_sgd ran Adam, identical to local).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from medfl.experiment import ExperimentConfig

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def load_quality():
    spec = importlib.util.spec_from_file_location("medfl_benchmark_quality", QUALITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


quality = load_quality()


def leaves(options: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (key path, value) of a nested mapping."""
    found = []
    for key, value in options.items():
        if isinstance(value, dict) and value:
            found += leaves(value, (*prefix, key))
        else:
            found.append(((*prefix, key), value))
    return found


ABSENT = object()


def lookup(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at `path`, or ABSENT (free-form options such as model.options have no defaults)."""
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return ABSENT
        config = config[key]
    return config


def resolved(experiment: dict[str, Any]) -> dict[str, Any]:
    """The experiment as medfl reads it, every default filled in (site files are not read here)."""
    return ExperimentConfig.model_validate({**experiment, "sites": ["site.yaml"]}).resolved()


VARIANT_RUNS = [(preset, task, label) for preset, plan in quality.PRESETS.items() for task in plan.tasks
                for label in plan.ablations_of(task) if label in quality.VARIANTS]


@pytest.mark.parametrize(("preset", "task", "label"), VARIANT_RUNS, ids=["-".join(run) for run in VARIANT_RUNS])
def test_variant_options_win_over_the_preset(preset: str, task: str, label: str, tmp_path: Path) -> None:
    plan = quality.PRESETS[preset].tasks[task]
    method, options = quality.VARIANTS[label]
    variant = resolved(quality.experiment_dict(task, plan, label, 0, tmp_path, 1, "cpu"))
    plain = resolved(quality.experiment_dict(task, plan, method, 0, tmp_path, 1, "cpu"))
    assert variant["method"] == method
    for path, value in leaves(options):
        assert lookup(variant, path) == value, f"{label}: {'.'.join(path)}"
    changed = [path for path, _ in leaves(options) if lookup(plain, path) != lookup(variant, path)]
    assert changed, f"{label} runs the same experiment as {method}"


def test_the_default_plan_has_the_prostate_optimizer_variant() -> None:
    """local_sgd measures the reference's plain SGD where the prostate plan uses Adam."""
    assert ("default", "prostate", "local_sgd") in VARIANT_RUNS
    plan = quality.PRESETS["default"].tasks["prostate"]
    assert plan.overrides["optimizer"]["name"] == "adam"


THREED_PRESETS = ("threed", "threed_full")


@pytest.mark.parametrize("preset", THREED_PRESETS)
def test_the_3d_plans_differ_from_the_2d_ones_only_in_dimensions(preset: str, tmp_path: Path) -> None:
    """2-D and 3-D runs of one method read the same sites (so they score the same test cases) with the same
    method, seed, rounds, epochs and optimizer; the 3-D experiment is valid as written (patch, spacing, window)."""
    plans = quality.PRESETS[preset].tasks
    quality.PRESETS[preset].data_sets()  # one synthetic data set for both: refused if they asked for two
    for method in quality.THREED_METHODS:
        two = resolved(quality.experiment_dict("prostate", plans["prostate"], method, 0, tmp_path, 1, "cpu"))
        three = resolved(quality.experiment_dict("prostate3d", plans["prostate3d"], method, 0, tmp_path, 1, "cpu"))
        assert (two["data"].get("dims", 2), three["data"]["dims"]) == (2, 3)  # 2-D configs resolve without it
        for key in ("method", "seed", "rounds", "local_epochs", "optimizer", "cpa", "task"):
            assert two[key] == three[key], key


def test_the_3d_preset_runs_every_seed_before_the_next(tmp_path: Path) -> None:
    """--threed --seeds 2: all six runs of seed 0 (3-D first) before any of seed 1, each in a fresh process."""
    preset = quality.with_seeds(quality.PRESETS["threed"], 2)
    jobs = quality.plan_jobs(preset, tmp_path, 1, "cpu")
    assert [job["seed"] for job in jobs] == [0] * 6 + [1] * 6
    assert [job["task"] for job in jobs[:3]] == ["prostate3d"] * 3
    assert all(job["fresh_process"] for job in jobs)
