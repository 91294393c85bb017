"""What hashing every data file costs at the start of a run, on the realistic federation.

A site's data fingerprint (medfl.data.fingerprint) holds the sha256 of every file its records read: the
dermoscopy reader hashes the bytes it reads to decode each image, the prostate reader hashes each case's files
right after reading them. This script measures the start-up of `medfl run` (from reading the experiment config
to the first round's start: every site reads, checks, hashes and caches its data and builds its models, and
the run folder is written) with hashing as medfl does it and with the two hash functions replaced by a constant,
side by side: per task, one untimed start-up first (so that both variants read from the page cache), then
`--repeats` start-ups of each variant, taking turns, each in a fresh process. The hashing variant also sums the
CPU seconds spent inside the hash functions (each reader thread's own CPU time, file reads included for the
files hashed by path) and the bytes hashed: on a shared machine that is the cost that does not depend on what
else runs, and it is compared with the start-up's CPU seconds.

The data: the quality benchmark's default preset (`benchmarks/quality.py`: `medfl synth --shift realistic`,
dermoscopy at scale 0.6 with 4 sites, prostate at scale 3.4 with 6 sites) and its experiments (method prr,
dermoscopy 32 px, prostate 64 px, one torch thread), written to `--synth` unless already there.

    python benchmarks/startup_hashing.py [--synth benchmarks/results/tmp/quality/default/synth] [--repeats 2]
        [--tasks dermoscopy prostate] [--output benchmarks/results/startup_hashing]
    python benchmarks/startup_hashing.py --smoke    # the quality benchmark's smoke data, one start-up per
                                                    # variant, no warm-up; nothing kept (the suite runs it)

Writes <output>.json and <output>.md and prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from quality import PRESETS, SMOKE, Preset, experiment_dict  # noqa: E402 - the quality benchmark's data and experiments

from medfl.checkpoints import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = BENCHMARKS / "results"
PRESET = PRESETS["default"]


class _Started(Exception):
    """Raised at the round loop's "start" event: start-up is over."""


def _data(synth: Path, task: str, preset: Preset) -> None:
    """The preset's synthetic sites of `task` under `synth` (generated once)."""
    if (synth / "site_configs" / task).is_dir():
        return
    from medfl.synth import generate

    print(f"writing the {task} sites to {synth} (once) ...", flush=True)
    generate(synth, **preset.generate_arguments(task))


def _timed(function: Any, totals: dict[str, float], lock: threading.Lock) -> Any:
    """`function` (a hash of bytes or of a file), summing its thread's CPU seconds and the bytes it hashed."""

    def wrapper(argument: Any) -> str:
        start = time.thread_time()
        digest = function(argument)
        size = len(argument) if isinstance(argument, bytes) else os.path.getsize(argument)
        with lock:
            totals["hash_cpu_s"] += time.thread_time() - start
            totals["hashed_bytes"] += size
        return digest

    return wrapper


def start_up(config_path: str, hashing: bool) -> dict[str, Any]:
    """One start-up of a run in this (fresh) process: wall and CPU seconds, and with hashing the CPU seconds
    and bytes hashed."""
    import torch

    import medfl.data.images as images
    import medfl.data.prostate as prostate
    from medfl.experiment import load_experiment_config
    from medfl.federated.coordinator import Coordinator
    from medfl.tasks import task_for

    totals, lock = {"hash_cpu_s": 0.0, "hashed_bytes": 0}, threading.Lock()
    if hashing:
        images.content_sha256 = _timed(images.content_sha256, totals, lock)
        prostate.file_sha256 = _timed(prostate.file_sha256, totals, lock)
    else:
        images.content_sha256 = prostate.file_sha256 = lambda argument: ""

    def progress(event: str, info: dict[str, Any]) -> None:
        if event == "start":
            raise _Started

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="medfl-startup-") as folder:
        wall, cpu = time.perf_counter(), time.process_time()
        config = load_experiment_config(config_path)
        try:
            Coordinator(config, Path(folder) / "run", torch.device("cpu"), progress=progress,
                        task=task_for(config.task)).run()
        except _Started:
            pass
        else:
            raise RuntimeError("the run finished without a start event")
        result = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    return {**result, **(totals if hashing else {}), "hashing": hashing,
            "load_average_1min": os.getloadavg()[0]}


def _in_fresh_process(config_path: Path, hashing: bool) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(start_up, str(config_path), hashing).result()


def measure(task: str, synth: Path, folder: Path, repeats: int, preset: Preset = PRESET,
            warm_up: bool = True) -> dict[str, Any]:
    """Start-ups of one task's run with and without hashing, taking turns after one untimed warm-up (`warm_up`:
    the page cache then holds the data for both variants alike; --smoke, whose numbers are not read, skips it)."""
    _data(synth, task, preset)
    plan = preset.tasks[task]
    config = experiment_dict(task, plan, "prr", 0, synth, threads=1, device="cpu")
    config_path = atomic_write_text(folder / f"{task}.yaml", yaml.safe_dump(config, sort_keys=False))
    files = sum(1 for site in (synth / task).iterdir() for path in site.rglob("*") if path.is_file())
    print(f"{task}: {len(config['sites'])} sites, {files} files{'; warm-up start-up ...' if warm_up else ''}",
          flush=True)
    if warm_up:
        _in_fresh_process(config_path, True)
    runs: list[dict[str, Any]] = []
    for repeat in range(repeats):
        for hashing in (False, True) if repeat % 2 == 0 else (True, False):
            runs.append(_in_fresh_process(config_path, hashing))
            print(f"  {'with' if hashing else 'without'} hashing: {runs[-1]['wall_s']:.1f} s wall, "
                  f"{runs[-1]['cpu_s']:.1f} s CPU", flush=True)
    with_hash = [r for r in runs if r["hashing"]]
    without = [r for r in runs if not r["hashing"]]
    def median(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    wall_on, wall_off = median(with_hash, "wall_s"), median(without, "wall_s")
    cpu_on, cpu_off, hash_cpu = median(with_hash, "cpu_s"), median(without, "cpu_s"), median(with_hash, "hash_cpu_s")
    return {"task": task, "sites": len(config["sites"]), "files": files, "runs": runs,
            "hashed_bytes": with_hash[0]["hashed_bytes"],
            "wall_with_s": wall_on, "wall_without_s": wall_off, "wall_difference_percent": 100 * (wall_on / wall_off - 1),
            "cpu_with_s": cpu_on, "cpu_without_s": cpu_off, "cpu_difference_percent": 100 * (cpu_on / cpu_off - 1),
            "hash_cpu_s": hash_cpu, "hash_percent_of_startup_cpu": 100 * hash_cpu / cpu_on,
            "hash_mb_per_cpu_s": with_hash[0]["hashed_bytes"] / 1e6 / hash_cpu if hash_cpu else None}


def markdown(results: list[dict[str, Any]], info: dict[str, Any], preset: Preset = PRESET) -> str:
    what = ("the realistic federation of `benchmarks/quality.py` (default preset" if preset is PRESET
            else "the smoke data of `benchmarks/quality.py` (its --smoke preset")
    lines = ["# Start-up of a run with and without hashing every data file", "",
             f"Data: {what}: {preset.data_text()}); "
             f"method prr, one torch thread, {info['repeats']} start-ups per variant (medians), each in a fresh "
             f"process after one untimed warm-up. Machine: {info['machine']}, {info['cpus']} CPUs, 1-minute load "
             f"average {info['load_before']:.1f} before, {info['load_after']:.1f} after.", "",
             "| task | sites | files | MB hashed | start-up wall s, without / with hashing | CPU s, without / with | "
             "CPU s inside sha256 | share of start-up CPU | sha256 MB per CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['task']} | {r['sites']} | {r['files']} | {r['hashed_bytes'] / 1e6:.0f} | "
                     f"{r['wall_without_s']:.1f} / {r['wall_with_s']:.1f} ({r['wall_difference_percent']:+.1f}%) | "
                     f"{r['cpu_without_s']:.1f} / {r['cpu_with_s']:.1f} ({r['cpu_difference_percent']:+.1f}%) | "
                     f"{r['hash_cpu_s']:.2f} | {r['hash_percent_of_startup_cpu']:.1f}% | {r['hash_mb_per_cpu_s']:.0f} |")
    lines += ["", "Start-up: from reading the experiment config to the first round's start (every site reads, "
              "checks, hashes and caches its data and builds its models; the run folder is written). Medians of "
              "the start-ups. On a shared machine the wall and CPU differences between the variants are mostly "
              "noise; the CPU seconds inside sha256 (each reader thread's own, file reads included) are the cost "
              "itself, and their share of the start-up's CPU seconds is the number that decides (a sizes-only "
              "fast path would be kept only above 5%).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synth", type=Path, default=RESULTS / "tmp" / "quality" / "default" / "synth",
                        help="the synthetic federation (written when absent)")
    parser.add_argument("--repeats", type=int, default=2, help="start-ups per variant and task (default 2)")
    parser.add_argument("--tasks", nargs="+", default=list(PRESET.tasks), choices=list(PRESET.tasks))
    parser.add_argument("--output", type=Path, default=RESULTS / "startup_hashing")
    parser.add_argument("--smoke", action="store_true",
                        help="prostate (whose volumes the hashing reads most) on the quality benchmark's smoke data, "
                             "one start-up per variant and no warm-up; data and results go to a temporary folder that is removed")
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="medfl-startup-smoke-") as tmp:
            args.synth, args.output, args.repeats = Path(tmp) / "synth", Path(tmp) / "startup_hashing", 1
            args.tasks = ["prostate"]  # the code path is the task's own only in the data it hashes
            return benchmark(args, SMOKE, warm_up=False)
    return benchmark(args, PRESET)


def benchmark(args: argparse.Namespace, preset: Preset, warm_up: bool = True) -> int:
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "repeats": args.repeats,
            "load_before": os.getloadavg()[0], "python": sys.version.split()[0]}
    folder = Path(tempfile.mkdtemp(prefix="medfl-startup-configs-"))
    try:
        results = [measure(task, args.synth.resolve(), folder, args.repeats, preset, warm_up) for task in args.tasks
                   if task in preset.tasks]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    info["load_after"] = os.getloadavg()[0]
    text = markdown(results, info, preset)
    print(text)
    atomic_write_json(args.output.with_suffix(".json"), {"info": info, "results": results})
    atomic_write_text(args.output.with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
