"""`medfl verify EXPORT_OR_BUNDLE`: check every file an export or a bundle records a sha256 for.

Neither torch nor MONAI is loaded: only the recorded hashes and the files' bytes are read.
"""

from __future__ import annotations

import argparse

from medfl.commands import existing_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="EXPORT_OR_BUNDLE",
                        help="one site's export or bundle folder, or an export or bundle root (every site in it)")


def run(args: argparse.Namespace) -> int:
    existing_folder(args.path, "export or bundle folder")

    from medfl.manifests import Verified, verify

    def report(result: Verified) -> None:
        recorded = "manifest.json" if result.kind == "export" else "configs/metadata.json"
        print(f"{result.kind} of site '{result.site}' ({result.folder}): {len(result.files)} file(s) match the "
              f"sha256 that {recorded} records")
        for name, digest in result.files:
            print(f"  ok  {name}  sha256 {digest}")

    results = verify(args.path, on_folder=report)
    print(f"verified {len(results)} folder(s)")
    return 0
