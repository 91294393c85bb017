"""Site data: find records in a site folder, validate them, split them, and build MONAI datasets.

`load_site(site, settings)` is the entry point for experiments; `inspect_site` and `validate_site` serve
`medfl check`. `load_recipe` and `build_dataset` turn records into cached MONAI datasets.
"""

from medfl.data.problems import Problem
from medfl.data.recipes import build_dataset, load_recipe, resolve_recipe
from medfl.data.site import SiteData, SiteReport, inspect_site, load_site, validate_site
from medfl.data.volumes import CaseGeometry

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
