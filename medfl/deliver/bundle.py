"""An export folder as `medfl predict` and `medfl evaluate` see it: find it, read its manifest, load its model.

One site's export holds `manifest.json`, `model.pt` (a state dict), `model.pt2` (a torch.export program
returning logits) and `eval_transforms.yaml` (the resolved evaluation recipe). Before any of them is used,
every file the manifest lists is checked against its sha256 (and each of those three must be listed), so a
changed, truncated or swapped file is refused with one line naming it. The recipe must also pass the recipe
allow-list, and the weights load with weights_only=True, so even an export whose manifest was rewritten to
match cannot run code or reach files beyond the inputs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfl.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "medfl-export/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.pt"
PROGRAM = "model.pt2"
RECIPE = "eval_transforms.yaml"
EXPORT_FILES = (WEIGHTS, PROGRAM, RECIPE)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (what `sha256sum` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _site_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []


def find_export(path: str | Path, site: str | None = None) -> Path:
    """One site's export folder: `path` itself when it holds a manifest, else `path/<site>` of an export root.

    An export root with a single site needs no `site`; with several, `site` chooses one.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        if site is not None and read_manifest(path)["site"] != site:
            raise ConfigError(f"{path}: this export is site '{read_manifest(path)['site']}', not '{site}'")
        return path
    folders = _site_folders(path)
    if not folders:
        raise ConfigError(f"{path}: not an export folder (no {MANIFEST} in it or in its sub-folders)")
    names = [folder.name for folder in folders]
    if site is not None:
        if site not in names:
            raise ConfigError(f"{path}: no export of site '{site}' (sites: {', '.join(names)})")
        return path / site
    if len(folders) > 1:
        raise ConfigError(f"{path}: holds the exports of sites {', '.join(names)}; choose one with --site")
    return folders[0]


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of one site's export; a missing, unreadable or foreign manifest is a ConfigError."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: manifest not found (is {folder} an export folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: unreadable manifest ({' '.join(str(error).split())[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a medfl export manifest (expected format '{FORMAT}')")
    return manifest


@dataclass
class ExportedModel:
    """One site's exported network (eval mode, on `device`) with its manifest."""

    folder: Path
    manifest: dict[str, Any]
    network: nn.Module
    device: torch.device

    @property
    def site(self) -> str:
        return str(self.manifest["site"])

    @property
    def task(self) -> str:
        return str(self.manifest["task"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def input_size(self) -> int:
        return int(self.manifest["input"]["size"][0])

    @property
    def in_channels(self) -> int:
        return int(self.manifest["input"]["channels"])

    @property
    def recipe_path(self) -> Path:
        """The resolved evaluation recipe, loadable with `medfl.data.load_recipe`."""
        return self.folder / RECIPE

    def describe(self) -> str:
        """`site 'a' (personalized model P, round 3)` for messages."""
        return describe_export(self.manifest)


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists against its sha256; the export's own files must all be listed, and
    a listed name must be a file of this folder. The first mismatch is one DataError naming the file."""
    site = str(manifest.get("site"))
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise DataError("the manifest lists no file hashes", site=site, path=str(folder / MANIFEST))
    unlisted = [name for name in EXPORT_FILES if name not in files]
    if unlisted:
        raise DataError(f"the manifest lists no sha256 for {unlisted[0]}", site=site, path=str(folder / MANIFEST))
    for name, expected in files.items():
        if Path(name).name != name or name in (".", "..", MANIFEST) or not isinstance(expected, str):
            raise DataError(f"the manifest lists '{name}', which is not a file of the export", site=site,
                            path=str(folder / MANIFEST))
        path = folder / name
        if not path.is_file():
            raise DataError("not found (the manifest lists it)", site=site, path=str(path))
        if sha256_file(path) != expected:
            raise DataError(f"sha256 differs from the manifest's ({expected[:12]}...): the file changed after export",
                            site=site, path=str(path))


def open_export(path: str | Path, site: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A site's export folder and its manifest, every listed file checked against its sha256; no torch needed,
    so commands call it before torch loads."""
    folder = find_export(path, site)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    return folder, manifest


def describe_export(manifest: dict[str, Any]) -> str:
    """`site 'a' (personalized model P, round 3)` for messages."""
    model = manifest["model"]
    return f"site '{manifest['site']}' ({model['role']} model {model['name']}, round {manifest['round']['selected']})"


def load_export(path: str | Path, site: str | None = None, device: torch.device | str = "cpu") -> ExportedModel:
    """Find a site's export, verify all its files against the manifest's sha256, check its recipe against the
    allow-list, and rebuild its network; nothing of the export is used before all of this has passed."""
    import torch

    from medfl.checkpoints import load_torch_file
    from medfl.data.recipes import resolve_recipe
    from medfl.models import build_model

    folder, manifest = open_export(path, site)
    resolve_recipe(folder / RECIPE)
    state = load_torch_file(folder / WEIGHTS, site=str(manifest["site"]))
    network = build_model(**manifest["network"])
    network.load_state_dict(state)
    device = torch.device(device)
    network.to(device).eval()
    return ExportedModel(folder, manifest, network, device)
