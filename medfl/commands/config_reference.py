"""`medfl config-reference`: the site-config and experiment-config references, generated from the models.

Without options it prints both as markdown; `--out DIR` writes DIR/site-config.md and
DIR/experiment-config.md (the project's docs/ are regenerated with `--out docs`); `--check DIR` writes
nothing and exits 1 when the files in DIR are missing or stale.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", metavar="DIR", help="write site-config.md and experiment-config.md into DIR")
    target.add_argument("--check", metavar="DIR", help="exit 1 when DIR's references are missing or stale")


def run(args: argparse.Namespace) -> int:
    from medfl.config_reference import REGENERATE, references, stale_references, write_references

    if args.check:
        stale = stale_references(args.check)
        for path in stale:
            print(f"stale or missing: {path} (regenerate with `{REGENERATE}`)", file=sys.stderr)
        return 1 if stale else 0
    if args.out:
        for path in write_references(args.out):
            print(f"wrote {path}")
        return 0
    print("\n".join(references().values()), end="")
    return 0
