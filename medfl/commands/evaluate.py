"""`medfl evaluate EXPORT_DIR SITE_CONFIG`: score an exported model on a site's labelled data."""

from __future__ import annotations

import argparse
import sys

from medfl.commands import DEVICE_CHOICES, DEVICE_HELP, existing_folder, file_to_write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", help="one site's export folder, or an export root (then --site)")
    parser.add_argument("site_config", help="the site config (YAML) of the data to score on: its own or another site's")
    parser.add_argument("--split", choices=("train", "val", "test", "all"), default="test",
                        help="which split of that site (default: test; all: every labelled sample, what a site "
                             "that did not take part in the run wants)")
    parser.add_argument("--site", help="the exported site to use when EXPORT_DIR holds several")
    parser.add_argument("--out", help="JSON file for the scores (default: <export>/evaluations/<site>_<split>.json)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)


def run(args: argparse.Namespace) -> int:
    """Check the export, the site config, the output file and the device; then load the model and score."""
    from medfl.config import load_site_config
    from medfl.deliver.bundle import open_export
    from medfl.deliver.evaluate import check_site, split_note
    from medfl.devices import check_device

    existing_folder(args.export_dir, "export folder")
    site = load_site_config(args.site_config)
    folder, manifest = open_export(args.export_dir, args.site)
    check_site(manifest, site, args.split)
    if args.out:
        file_to_write(args.out, "--out")
    check_device(args.device)
    note = split_note(manifest, site, args.split)
    if note:
        print(f"note: {note}", file=sys.stderr)

    from medfl.checkpoints import atomic_write_json
    from medfl.deliver import evaluate_export, load_export
    from medfl.deliver.evaluate import default_output
    from medfl.devices import resolve_device
    from medfl.tasks import task_for_export

    export = load_export(folder, device=resolve_device(args.device))
    result = evaluate_export(export, args.site_config, args.split, task=task_for_export(export.manifest))
    split = "all splits" if args.split == "all" else f"{args.split} split"
    print(f"{export.describe()} on site '{result['site']}', {split} ({result['scored']}):")
    for name, value in result["metrics"].items():
        print(f"  {name:<20} {value:.4f}" if isinstance(value, float) else f"  {name:<20} {value}")
    out = args.out or default_output(export, result["site"], args.split)
    atomic_write_json(out, result)
    print(f"written to {out}")
    return 0
