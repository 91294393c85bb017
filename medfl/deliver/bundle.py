"""An export folder as `medfl predict` and `medfl evaluate` see it: find it, read its manifest, load its model.

One site's export holds `manifest.json`, `model.pt` (a state dict), `model.pt2` (a torch.export program
returning logits) and `eval_transforms.yaml` (the resolved evaluation recipe). Before any of them is used,
the manifest is checked (medfl.manifests: every key the commands read, one line naming the file and key) and
every file the manifest lists is checked against its sha256 (and each of those three must be listed), so a
changed, truncated or swapped file is refused with one line naming it. The recipe must also pass the recipe
allow-list, and the weights load with weights_only=True, so even an export whose manifest was rewritten to
match cannot run code or reach files beyond the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfl.manifests import (
    EXPORT_FILES,
    FORMAT,
    MANIFEST,
    PROGRAM,
    RECIPE,
    WEIGHTS,
    find_export,
    read_manifest,
    sha256_file,
    verify_files,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["EXPORT_FILES", "FORMAT", "MANIFEST", "PROGRAM", "RECIPE", "WEIGHTS", "ExportedModel", "describe_export",
           "find_export", "load_export", "open_export", "read_manifest", "sha256_file", "verify_files"]


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


def open_export(path: str | Path, site: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A site's export folder and its manifest (checked by its pydantic model), every listed file checked against
    its sha256; no torch needed, so commands call it before torch loads."""
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
    # start-up: torch, MONAI and the networks load only once the manifest has been checked
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
