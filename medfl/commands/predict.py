"""`medfl predict EXPORT_DIR INPUT... --out DIR`: apply a site's exported model to images or MRI volumes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfl.commands import DEVICE_CHOICES, DEVICE_HELP, existing_folder, folder_to_write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", help="one site's export folder, or an export root (then --site)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="dermoscopy images (JPEG, PNG) or MRI volumes (NIfTI, MetaImage)")
    parser.add_argument("--out", required=True, help="folder for predictions.csv or the predicted masks")
    parser.add_argument("--site", help="the site to use when EXPORT_DIR holds several")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)


def _report(result) -> None:
    if result.error:
        print(f"medfl predict: {result.input}: {result.error}", file=sys.stderr)
    else:
        print(f"{result.input}: {result.summary} -> {result.output}")


def _summary(results: list, failed: int) -> str:
    return f"{len(results) - failed} of {len(results)} input(s) predicted" + (f", {failed} failed" if failed else "")


def run(args: argparse.Namespace) -> int:
    """Check the export, the inputs' paths, the output folder and the device; then load the model and predict."""
    from medfl.deliver.bundle import open_export
    from medfl.deliver.inputs import Prediction, path_problems
    from medfl.devices import check_device

    existing_folder(args.export_dir, "export folder")
    folder_to_write(args.out, "--out (where predictions.csv or the masks go)")
    folder, manifest = open_export(args.export_dir, args.site)
    inputs = [Path(path) for path in args.inputs]
    problems = path_problems(inputs, manifest["task"], Path(args.out))
    check_device(args.device)
    if all(problems):  # nothing to predict: say why for each input, without loading the model or writing
        refused = [Prediction(path, error=problem) for path, problem in zip(inputs, problems, strict=True)]
        for result in refused:
            _report(result)
        print(_summary(refused, len(refused)))
        return 1

    from medfl.deliver import load_export, predict
    from medfl.devices import resolve_device

    export = load_export(folder, device=resolve_device(args.device))
    print(f"predicting with {export.describe()}", file=sys.stderr)
    results = predict(export, inputs, args.out, on_file=_report)
    failed = sum(result.error is not None for result in results)
    print(_summary(results, failed))
    return 1 if failed else 0
