"""How long every `medfl` command takes to its first error line, and to its first useful output.

Each case runs `medfl` in a fresh process (what a user pays every time), `--repeats` times, taking turns, and
records when the first line reached the case's stream (stderr for an error, stdout for a result; the progress
lines of `run` are on stderr) and when the process exited:

- error cases (exit status 1): a mistake each command must answer before torch and MONAI load: a misspelt
  key (`check`, `run`), an unknown site (`export`), an export root without `--site` or a folder as input
  (`predict`, `evaluate`), a folder that is not a run (`report`), a used job folder (`nvflare-job`), stale
  references (`config-reference --check`), a file as `--out` (`synth`), existing files (`init`), an unknown
  page (`docs`), and `--device cuda` (`run`, `predict`) where the installed torch has no GPU back end (skipped
  otherwise: there a cuda request is answered by torch itself);
- output cases (exit status 0): `--help`, `--version`, and every command doing its work on a tiny synthetic
  federation (`medfl synth` at scale 0.01, two dermoscopy sites, a one-round run of a slim VGG-16 x0.125 on
  32 px images, its export): the first useful line is `synth`'s first site, `check`'s settings header, `run`'s
  "rounds ..., sites ..." (the federation has started: data read, models built), `export`'s first site,
  `predict`'s first prediction, `evaluate`'s scores, `report`'s path, `nvflare-job`'s job, `config-reference`'s
  markdown, `init`'s first file and `docs`' first page.

Target: every error case answers in under a second on an idle machine. The fixture (synthetic data, a run and
its export) is made once, untimed, with the same executable. Exit statuses are recorded (the script exits 1
when one differs from the expected). The machine's 1-minute load average is recorded before and after: on a
busy machine every number grows.

    python benchmarks/cli_latency.py [--repeats 3] [--medfl PATH] [--output benchmarks/results/cli_latency]

`--medfl` times another installation's `medfl` executable (e.g. an older checkout's, for a before/after
comparison); by default the one beside this interpreter. Writes <output>.json and <output>.md. `--smoke`: one
call per case, every error case and four output cases (SMOKE_OUTPUT_CASES; the timed `run` makes the fixture's
run, exported before the other cases), results in a temporary folder that is removed (the suite runs it).
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SITE = "name: site_a\ntask: classification\ndata_root: .\nlayuot: csv\nlabel_map: {nv: nv, mel: mel}\n"
EXPERIMENT = "name: latency\ntask: classification\nsites: [site.yaml]\ndata: {classes: [nv, mel]}\nrouns: 3\n"
GOOD_SITE = "name: site_a\ntask: classification\ndata_root: .\nlayout: csv\nlabel_map: {nv: nv, mel: mel}\n"
TINY = """name: tiny
task: classification
sites: [data/site_configs/dermoscopy/derm_a.yaml, data/site_configs/dermoscopy/derm_b.yaml]
data: {classes: [nv, bkl, mel], input_size: 32, num_workers: 0}
model: {name: slim_vgg16, width: 0.125}
rounds: 1
local_epochs: 1
runtime: {threads: 1}
"""
SMOKE_OUTPUT_CASES = ("help", "version", "check", "run")
SYNTH = ["--scale", "0.01", "--derm-sites", "2", "--prostate-sites", "0", "--min-per-class", "3,2,2"]
# The fixture's commands, in order: a tiny synthetic federation, a one-round run, its export.
FIXTURE_SYNTH = ["synth", "--out", "data", *SYNTH]
FIXTURE_RUN = ["run", "tiny.yaml", "--out", "run", "--quiet"]
FIXTURE_EXPORT = ["export", "run", "--out", "exports"]


@dataclass
class Case:
    """One call: its arguments ({i}: the call's number, for fresh output folders), the exit status it must
    have, and the stream whose first line is what the user waits for."""

    arguments: list[str]
    status: int
    stream: str

    @property
    def kind(self) -> str:
        return "error" if self.status else "output"


def default_medfl() -> str:
    beside = Path(sys.executable).with_name("medfl")
    return str(beside) if beside.is_file() else "medfl"


def _no_gpu_build(medfl: str) -> bool:
    """Whether the torch beside `medfl` was built without CUDA and ROCm (read by medfl itself, no torch)."""
    python = Path(medfl).with_name("python")
    code = "from medfl.devices import installed_torch_gpu_backends as b; print(b() == set())"
    result = subprocess.run([str(python) if python.is_file() else sys.executable, "-c", code],
                            capture_output=True, text=True)
    return result.stdout.strip() == "True"


def prepare(folder: Path, medfl: str, commands: tuple[list[str], ...] = (FIXTURE_SYNTH, FIXTURE_RUN, FIXTURE_EXPORT)
            ) -> None:
    """The fixture, untimed: configs, odd paths and `commands` (a tiny synthetic federation, a one-round run and
    its export)."""
    (folder / "site_misspelt.yaml").write_text(SITE, encoding="utf-8")
    (folder / "site.yaml").write_text(GOOD_SITE, encoding="utf-8")
    (folder / "experiment.yaml").write_text(EXPERIMENT, encoding="utf-8")
    (folder / "tiny.yaml").write_text(TINY, encoding="utf-8")
    (folder / "a_file.txt").write_text("not a folder", encoding="utf-8")
    (folder / "a_folder").mkdir()
    (folder / "used_job").mkdir()
    (folder / "used_job" / "kept.txt").write_text("a job folder in use", encoding="utf-8")
    (folder / "no_docs").mkdir()
    run_fixture(folder, medfl, commands)
    # an older medfl without `init` is still timed: its init cases then show exit status 2
    subprocess.run([medfl, "init", "started"], cwd=folder, capture_output=True, timeout=60)


def run_fixture(folder: Path, medfl: str, commands: tuple[list[str], ...]) -> None:
    """The fixture's `medfl` commands, one after another, untimed; SystemExit when one fails."""
    for arguments in commands:
        result = subprocess.run([medfl, *arguments], cwd=folder, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"preparing `medfl {' '.join(arguments)}` failed:\n{result.stderr}")


def cases(folder: Path, gpu_build: bool, smoke: bool = False) -> dict[str, Case]:
    """Name -> case; paths are relative to `folder`, where every call runs. `smoke`: the error cases and
    SMOKE_OUTPUT_CASES only (the script's code path is the same for every case; each output case costs a start-up
    of torch and MONAI). In smoke mode the `run` case writes the fixture's run (measure times it first)."""
    images = sorted(str(p.relative_to(folder)) for p in (folder / "data" / "dermoscopy" / "derm_b").rglob("*.jpg"))[:2]
    derm_a, derm_b = (f"data/site_configs/dermoscopy/{site}.yaml" for site in ("derm_a", "derm_b"))
    plan = {
        "help": Case(["--help"], 0, "stdout"),
        "version": Case(["--version"], 0, "stdout"),
        "check_misspelt_key": Case(["check", "site_misspelt.yaml"], 1, "stderr"),
        "run_misspelt_key": Case(["run", "experiment.yaml"], 1, "stderr"),
        "run_device_cuda": Case(["run", "tiny.yaml", "--out", "cuda_run", "--device", "cuda"], 1, "stderr"),
        "synth_out_is_a_file": Case(["synth", "--out", "a_file.txt"], 1, "stderr"),
        "export_unknown_site": Case(["export", "run", "--site", "nosuch", "--out", "e"], 1, "stderr"),
        "predict_root_without_site": Case(["predict", "exports", images[0], "--out", "p"], 1, "stderr"),
        "predict_a_folder": Case(["predict", "exports/derm_a", "a_folder", "--out", "p"], 1, "stderr"),
        "predict_device_cuda": Case(["predict", "exports/derm_a", images[0], "--out", "p", "--device", "cuda"], 1,
                                    "stderr"),
        "evaluate_root_without_site": Case(["evaluate", "exports", derm_a], 1, "stderr"),
        "report_not_a_run": Case(["report", "a_folder"], 1, "stderr"),
        "nvflare_job_used_folder": Case(["nvflare-job", "tiny.yaml", "--out", "used_job"], 1, "stderr"),
        "config_reference_stale": Case(["config-reference", "--check", "no_docs"], 1, "stderr"),
        "init_existing": Case(["init", "started"], 1, "stderr"),
        "docs_unknown_page": Case(["docs", "nosuch"], 1, "stderr"),
        "synth": Case(["synth", "--out", "synth_{i}", *SYNTH], 0, "stdout"),
        "check": Case(["check", derm_a, derm_b], 0, "stdout"),
        "run": Case(["run", "tiny.yaml", "--out", "run_{i}", "--quiet"], 0, "stderr"),
        "export": Case(["export", "run", "--out", "exports_{i}"], 0, "stdout"),
        "predict": Case(["predict", "exports/derm_a", *images, "--out", "predictions_{i}"], 0, "stdout"),
        "evaluate": Case(["evaluate", "exports/derm_a", derm_b, "--out", "scores_{i}.json"], 0, "stdout"),
        "report": Case(["report", "run", "--out", "report_{i}"], 0, "stdout"),
        "nvflare_job": Case(["nvflare-job", "tiny.yaml", "--out", "job_{i}"], 0, "stdout"),
        "config_reference": Case(["config-reference"], 0, "stdout"),
        "init": Case(["init", "init_{i}"], 0, "stdout"),
        "docs": Case(["docs"], 0, "stdout"),
    }
    if smoke:  # every error case (each answers before torch loads) and the output cases of both kinds of stream
        plan = {name: case for name, case in plan.items() if case.status or name in SMOKE_OUTPUT_CASES}
        plan["run"] = Case(FIXTURE_RUN, 0, "stderr")  # the same run as the fixture's: it is the fixture's run
    if gpu_build:  # a cuda request is answered by torch itself there, and may well succeed
        plan = {name: case for name, case in plan.items() if not name.endswith("_device_cuda")}
    return plan


def time_call(command: list[str], cwd: Path) -> tuple[dict[str, float | None], float, int]:
    """Seconds from start to the first line on stdout and on stderr (None: no line), to exit, and the status."""
    first: dict[str, float | None] = {"stdout": None, "stderr": None}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def watch(name: str, stream) -> None:
        for _ in stream:
            if first[name] is None:
                first[name] = time.perf_counter() - start
        stream.close()

    readers = [threading.Thread(target=watch, args=(name, getattr(process, name))) for name in first]
    for reader in readers:
        reader.start()
    status = process.wait(timeout=1800)
    elapsed = time.perf_counter() - start
    for reader in readers:
        reader.join()
    return first, elapsed, status


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(results: dict) -> str:
    info = results["machine"]
    lines = [
        "# CLI latency: seconds to the first error line or the first useful output, fresh process each call",
        "",
        f"`{results['medfl']}` on {info['cpu']} ({info['cpu_cores']} cores), Python {info['python']}; "
        f"1-minute load average {info['load_average_1min_start']} before, {info['load_average_1min_end']} after; "
        f"{results['repeats']} calls per case, taking turns. First line: on stderr for errors and `run`'s "
        "progress, on stdout otherwise.",
        "",
        "| case | kind | first line, median s | min s | max s | exit, median s | exit status (expected) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, case in results["cases"].items():
        statuses = ", ".join(map(str, case["exit_statuses"]))
        firsts = [v for v in case["first_line_s"] if v is not None]
        lines.append(f"| {name} | {case['kind']} | {_seconds(case['first_line_median_s'])} | "
                     f"{_seconds(min(firsts) if firsts else None)} | {_seconds(max(firsts) if firsts else None)} | "
                     f"{_seconds(case['exit_median_s'])} | {statuses} ({case['expected_exit_status']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="calls per case (default 3)")
    parser.add_argument("--medfl", default=default_medfl(), help="the medfl executable to time")
    parser.add_argument("--output", type=Path, default=RESULTS / "cli_latency", help="path stem of the results")
    parser.add_argument("--smoke", action="store_true",
                        help="one call per case, the error cases and four output cases; results to a removed "
                             "temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            return measure(argparse.Namespace(**{**vars(args), "repeats": 1, "output": Path(tmp) / "cli_latency"}))
    return measure(args)


def measure(args: argparse.Namespace) -> int:
    """Time every case, write <output>.json and .md; 1 when an exit status differs from the expected."""
    env_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # --smoke: the timed `run` case is the fixture's run, so that the run costs one start-up of torch and MONAI,
        # not two: the fixture without run and export, the `run` case timed first, its export, every other case.
        prepare(folder, args.medfl, (FIXTURE_SYNTH,) if args.smoke else (FIXTURE_SYNTH, FIXTURE_RUN, FIXTURE_EXPORT))
        plan = cases(folder, gpu_build=not _no_gpu_build(args.medfl), smoke=args.smoke)
        firsts: dict[str, list[float | None]] = {name: [] for name in plan}
        exits: dict[str, list[float]] = {name: [] for name in plan}
        statuses: dict[str, set[int]] = {name: set() for name in plan}

        def call(name: str, i: int) -> None:
            case = plan[name]
            command = [args.medfl, *(part.replace("{i}", str(i)) for part in case.arguments)]
            first, elapsed, status = time_call(command, folder)
            firsts[name].append(first[case.stream])
            exits[name].append(elapsed)
            statuses[name].add(status)

        time_call([args.medfl, "--version"], folder)  # warm the file cache once, untimed
        if args.smoke:  # one call per case
            call("run", 0)
            run_fixture(folder, args.medfl, (FIXTURE_EXPORT,))
            for name in plan:
                if name != "run":
                    call(name, 0)
        else:
            for i in range(args.repeats):
                for name in plan:
                    call(name, i)
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
                    "load_average_1min_start": None if env_load is None else round(env_load, 2),
                    "load_average_1min_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "cases": {name: {"kind": case.kind, "stream": case.stream, "arguments": case.arguments,
                         "first_line_median_s": _median(firsts[name]), "first_line_s": firsts[name],
                         "exit_median_s": statistics.median(exits[name]), "exit_s": exits[name],
                         "exit_statuses": sorted(statuses[name]), "expected_exit_status": case.status}
                  for name, case in plan.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = markdown(results)
    args.output.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text, end="")
    wrong = [name for name, case in plan.items() if statuses[name] != {case.status}]
    if wrong:
        print(f"unexpected exit status in: {', '.join(wrong)}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
