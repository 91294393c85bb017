"""`medfl predict EXPORT_DIR INPUT... --out DIR`: apply a site's exported model to images or MRI volumes."""

from __future__ import annotations

import argparse
import sys

from medfl.commands import DEVICE_CHOICES, DEVICE_HELP, existing_folder, output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", help="one site's export folder, or an export root (then --site)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="dermoscopy images (JPEG, PNG) or MRI volumes (NIfTI, MetaImage)")
    parser.add_argument("--out", required=True, help="folder for predictions.csv or the predicted masks")
    parser.add_argument("--site", help="the site to use when EXPORT_DIR holds several")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)


def run(args: argparse.Namespace) -> int:
    existing_folder(args.export_dir, "export folder")
    output_folder(args.out, "--out (where predictions.csv or the masks go)")

    from medfl.deliver import load_export, predict
    from medfl.devices import resolve_device

    export = load_export(args.export_dir, args.site, resolve_device(args.device))
    print(f"predicting with {export.describe()}", file=sys.stderr)

    def report(result) -> None:
        if result.error:
            print(f"medfl predict: {result.input}: {result.error}", file=sys.stderr)
        else:
            print(f"{result.input}: {result.summary} -> {result.output}")

    results = predict(export, args.inputs, args.out, on_file=report)
    failed = sum(result.error is not None for result in results)
    print(f"{len(results) - failed} of {len(results)} input(s) predicted" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0
