"""Site data: find records in a site folder, validate them, split them, and build MONAI datasets.

`load_site(site, settings, task=...)` is the entry point for experiments (the caller hands in the site's task);
`inspect_site` and `validate_site` serve `medfl check`. `load_recipe` and `build_dataset` turn records into cached
MONAI datasets.

The names below are imported on first use (PEP 562), so that `from medfl.data import inspect_site` does
not load MONAI: `medfl check` reports a misspelt config key before torch or MONAI is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medfl.data.problems import Problem
    from medfl.data.recipes import build_dataset, load_recipe, resolve_recipe
    from medfl.data.site import SiteData, SiteReport, inspect_site, load_site, validate_site
    from medfl.data.volumes import CaseGeometry

_HOMES = {
    "CaseGeometry": "volumes",
    "Problem": "problems",
    "SiteData": "site",
    "SiteReport": "site",
    "build_dataset": "recipes",
    "inspect_site": "site",
    "load_recipe": "recipes",
    "load_site": "site",
    "resolve_recipe": "recipes",
    "validate_site": "site",
}

__all__ = [
    "CaseGeometry",
    "Problem",
    "SiteData",
    "SiteReport",
    "build_dataset",
    "inspect_site",
    "load_recipe",
    "load_site",
    "resolve_recipe",
    "validate_site",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'medfl.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"medfl.data.{_HOMES[name]}"), name)
