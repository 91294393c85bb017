"""How long the `medfl` command takes before it answers: --help, --version, and a config with a misspelt key.

Each case runs `medfl` in a fresh process (what a user pays every time), `--repeats` times, taking turns:

- `help`: `medfl --help`;
- `version`: `medfl --version`;
- `check_misspelt_key`: `medfl check` on a site config with `layuot:` instead of `layout:` (exit 1);
- `run_misspelt_key`: `medfl run` on an experiment config with `rouns:` instead of `rounds:` (exit 1).

Target: the misspelt-key cases exit 1 in under a second on an idle machine, because configs are validated
before torch and MONAI are imported. Exit statuses are recorded (the script exits 1 when one differs from the
expected: an older medfl exited 2 for a config error). The machine's 1-minute load
average is recorded before and after: on a busy machine every number grows.

    python benchmarks/cli_latency.py [--repeats 5] [--medfl PATH] [--output benchmarks/results/cli_latency]

`--medfl` times another installation's `medfl` executable (e.g. an older checkout's, for a before/after
comparison); by default the one beside this interpreter. Writes <output>.json and <output>.md. `--smoke`: one
call per case, results in a temporary folder that is removed (the suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SITE = "name: site_a\ntask: classification\ndata_root: .\nlayuot: csv\nlabel_map: {nv: nv, mel: mel}\n"
EXPERIMENT = "name: latency\ntask: classification\nsites: [site.yaml]\ndata: {classes: [nv, mel]}\nrouns: 3\n"
GOOD_SITE = "name: site_a\ntask: classification\ndata_root: .\nlayout: csv\nlabel_map: {nv: nv, mel: mel}\n"


def default_medfl() -> str:
    beside = Path(sys.executable).with_name("medfl")
    return str(beside) if beside.is_file() else "medfl"


def cases(folder: Path) -> dict[str, tuple[list[str], int]]:
    """Name -> (arguments, expected exit status)."""
    (folder / "site_misspelt.yaml").write_text(SITE, encoding="utf-8")
    (folder / "site.yaml").write_text(GOOD_SITE, encoding="utf-8")
    (folder / "experiment.yaml").write_text(EXPERIMENT, encoding="utf-8")
    return {
        "help": (["--help"], 0),
        "version": (["--version"], 0),
        "check_misspelt_key": (["check", str(folder / "site_misspelt.yaml")], 1),
        "run_misspelt_key": (["run", str(folder / "experiment.yaml")], 1),
    }


def time_call(command: list[str]) -> tuple[float, int]:
    """Seconds from start to exit, and the exit status."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - start, result.returncode


def markdown(results: dict) -> str:
    info = results["machine"]
    lines = [
        "# CLI latency: seconds from start to exit, fresh process each call",
        "",
        f"`{results['medfl']}` on {info['cpu']} ({info['cpu_cores']} cores), Python {info['python']}; "
        f"1-minute load average {info['load_average_1min_start']} before, {info['load_average_1min_end']} after; "
        f"{results['repeats']} calls per case, taking turns.",
        "",
        "| case | median s | min s | max s | exit status (expected) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, case in results["cases"].items():
        statuses = ", ".join(map(str, case["exit_statuses"]))
        lines.append(f"| {name} | {case['median_s']:.2f} | {case['min_s']:.2f} | {case['max_s']:.2f} | "
                     f"{statuses} ({case['expected_exit_status']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="calls per case (default 5)")
    parser.add_argument("--medfl", default=default_medfl(), help="the medfl executable to time")
    parser.add_argument("--output", type=Path, default=RESULTS / "cli_latency", help="path stem of the results")
    parser.add_argument("--smoke", action="store_true", help="one call per case; results to a removed temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            return measure(argparse.Namespace(**{**vars(args), "repeats": 1, "output": Path(tmp) / "cli_latency"}))
    return measure(args)


def measure(args: argparse.Namespace) -> int:
    """Time every case, write <output>.json and .md; 1 when an exit status differs from the expected."""
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        plan = cases(Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in plan}
        statuses: dict[str, set[int]] = {name: set() for name in plan}
        time_call([args.medfl, "--version"])  # warm the file cache once, untimed
        for _ in range(args.repeats):
            for name, (arguments, _) in plan.items():
                elapsed, status = time_call([args.medfl, *arguments])
                times[name].append(elapsed)
                statuses[name].add(status)
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    root = Path(__file__).resolve().parents[1]
    executable = Path(args.medfl).resolve()
    results = {
        "medfl": executable.relative_to(root).as_posix() if executable.is_relative_to(root) else args.medfl,
        "repeats": args.repeats,
        "machine": {"cpu": cpu, "cpu_cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1min_start": load_start,
                    "load_average_1min_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "cases": {name: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
                         "exit_statuses": sorted(statuses[name]), "expected_exit_status": plan[name][1],
                         "seconds": values} for name, values in times.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = markdown(results)
    args.output.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text, end="")
    wrong = [name for name in plan if statuses[name] != {plan[name][1]}]
    if wrong:
        print(f"unexpected exit status in: {', '.join(wrong)}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
