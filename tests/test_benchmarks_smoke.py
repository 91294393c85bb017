"""Benchmarks that cannot rot: every script in benchmarks/ runs end to end in its smoke mode.

A refactor that moves what a benchmark imports, or changes a call it makes, broke scripts unnoticed before
(speed.py's K-sites section, calibrate_shift.py's loss). Each script runs here as a user runs it, in a fresh
process with one thread: `python benchmarks/<script>.py --smoke` takes every section and code path of the script
on tiny data, writes its results into a temporary folder that it removes, and must exit 0 without touching
benchmarks/results. Numbers are not checked (speed is measured by the scripts themselves, never asserted in
tests); a line each script prints once its last section ran is.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
BENCHMARKS = REPOSITORY / "benchmarks"
RESULTS = BENCHMARKS / "results"
# Every script, and what its smoke run prints once its last section ran.
SCRIPTS = {
    "aggregation": "| efficientnet-b0 |",
    "calibrate_shift": "mild prostate adam, batch norm seed 0",
    "cli_latency": "| run_misspelt_key |",
    "contest": "dermoscopy-prr-seed0: identical",
    "montage": "montage.prostate.64px.png",
    "quality": "Retrogress of D by server rule, on the same uploads (prostate-prr-seed0",
    "shift_sweep": "advice from the smoke figures at mean site shift",
    "speed": "# Sites side by side",
    "startup_hashing": "| prostate |",
    "synth_learnability": "| mean |",
}
HASHED_BYTES = 1 << 22  # files up to 4 MiB are compared by content too (results/tmp may hold gigabytes of runs)


def listing(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under `folder`: size, modification time and (small files) the sha256 of the bytes."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        info = path.stat()
        digest = ""
        if path.is_file() and info.st_size <= HASHED_BYTES:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        entries[path.relative_to(folder).as_posix()] = (info.st_size if path.is_file() else -1, info.st_mtime_ns, digest)
    return entries


def test_every_benchmark_script_has_a_smoke_run() -> None:
    assert sorted(path.stem for path in BENCHMARKS.glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_smoke_run(script: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MPLBACKEND": "Agg", "TMPDIR": str(tmp_path),
                # this checkout's medfl, in the script and in the `medfl` command cli_latency.py times
                "PYTHONPATH": os.pathsep.join([str(REPOSITORY), *filter(None, [env.get("PYTHONPATH")])])})
    before = listing(RESULTS)
    result = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{script}.py --smoke exited {result.returncode}:\n{result.stderr[-4000:]}"
    assert SCRIPTS[script] in result.stdout, result.stdout[-4000:]
    after = listing(RESULTS)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"{script}.py --smoke touched benchmarks/results: {changed}"
