"""`medfl docs [NAME] [--out DIR]`: medfl's documentation, from the installed package.

The pages are the repository's docs/ folder, which the wheel carries as medfl/docs (pyproject.toml maps it
there), so that a hospital with only the wheel reads the same pages as the checkout. Without NAME the pages
are listed; with NAME one is printed (markdown); `--out DIR` writes them (or NAME) into DIR instead, never
overwriting a file.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def docs_folder() -> Path:
    """The installed pages (medfl/docs in a wheel), or the checkout's docs/ when medfl runs from its source."""
    import importlib.resources

    import medfl

    installed = Path(str(importlib.resources.files("medfl") / "docs"))
    if (installed / "README.md").is_file():
        return installed
    return Path(medfl.__file__).resolve().parent.parent / "docs"


def pages() -> dict[str, Path]:
    """Page name (file name without .md) -> file, README (the index) first."""
    files = sorted(docs_folder().glob("*.md"), key=lambda path: (path.name != "README.md", path.name))
    return {path.stem: path for path in files}


def _title(path: Path) -> str:
    return next((line[2:].strip() for line in path.read_text(encoding="utf-8").splitlines()
                 if line.startswith("# ")), "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `medfl docs`."""
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="a page, e.g. install, site-config, experiment-config (default: list the pages)")
    parser.add_argument("--out", metavar="DIR", help="write the pages (or NAME) into DIR instead of printing")


def run(args: argparse.Namespace) -> int:
    """List, print or write the pages."""
    from medfl.checkpoints import atomic_write_text
    from medfl.commands import folder_to_write
    from medfl.errors import ConfigError

    found = pages()
    if not found:
        raise ConfigError(f"{docs_folder()}: no documentation found (is this a complete medfl installation?)")
    name = args.name.removesuffix(".md") if args.name else None
    if name is not None and name not in found:
        raise ConfigError(f"no page '{args.name}'; pages: {', '.join(found)}")
    chosen = {name: found[name]} if name else found
    if args.out:
        out = folder_to_write(args.out, "--out")
        taken = [str(out / path.name) for path in chosen.values() if (out / path.name).exists()]
        if taken:
            raise ConfigError(f"{', '.join(taken)} already exist(s): medfl docs never overwrites; choose another --out")
        for path in chosen.values():
            print(f"wrote {atomic_write_text(out / path.name, path.read_text(encoding='utf-8'))}")
        return 0
    if name:
        print(found[name].read_text(encoding="utf-8"), end="")
        return 0
    for page, path in found.items():
        print(f"{page:<20} {_title(path)}")
    print(f"(from {docs_folder()}; `medfl docs NAME` prints one, `medfl docs --out DIR` writes them all)")
    return 0
