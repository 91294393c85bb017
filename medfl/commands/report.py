"""`medfl report RUN_DIR [RUN_DIR ...]`: report.md with tables and PNG figures comparing runs.

Runs that differ only by seed are aggregated (mean ± std); methods sit side by side. The report goes to
--out (default RUN_DIR/report for one run, ./report for several); an existing report there is replaced,
since a report is derived from the run folders.
"""

from __future__ import annotations

import argparse
import sys

from medfl.commands import DEVICE_CHOICES, existing_folder, folder_to_write


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{text}'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `medfl report`."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by `medfl run`")
    parser.add_argument("--out", help="report folder (default: RUN_DIR/report for one run, ./report for several)")
    parser.add_argument("--no-predictions", action="store_true",
                        help="skip confusion matrices and segmentation examples (they rescore the selected "
                             "models on the sites' test data)")
    parser.add_argument("--examples", type=_count, default=2, metavar="N",
                        help="segmentation example slices per site (default 2; in 3-D, cases per site, each drawn "
                        "as three planes)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="device for rescoring the selected models: auto (the default: a CUDA GPU when there "
                             "is one), cpu or cuda")


def run(args: argparse.Namespace) -> int:
    """Check the run folders (each must be a run), the options and the device; then rescore and write."""
    from medfl.devices import check_device
    from medfl.report.runs import group_runs, load_run

    for run_dir in args.runs:
        existing_folder(run_dir, "run folder")
    runs = [load_run(run_dir) for run_dir in args.runs]
    group_runs(runs)  # read again by write_report: a few small files
    if args.out:
        folder_to_write(args.out, "--out")
    check_device(args.device)

    from medfl.devices import resolve_device
    from medfl.report.writer import write_report
    from medfl.runfolder import RunFolder
    from medfl.tasks import task_for

    first = runs[0]  # its config chooses the task's variant (data.dims 3: the volumetric one)
    task = task_for(first.task, RunFolder.open(first.path).config())
    report = write_report(args.runs, args.out, predictions=not args.no_predictions, examples=args.examples,
                          device=resolve_device(args.device), task=task)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"report written to {report.path} ({len(report.figures)} figures)")
    return 0
