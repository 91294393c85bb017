"""Transform recipes: YAML lists of MONAI transforms, and the cached datasets built from them.

A recipe file (a shipped one is package data: the repository's transforms/<name>.yaml, installed as the
package medfl.recipes) is a mapping:

    description: one line
    variables: {input_size: 64}          # defaults, overridden by load_recipe(..., input_size=128)
    transforms:
      - LoadImaged: {keys: [image], reader: PILReader, image_only: true}
      - Resized: {keys: [image], spatial_size: ["@input_size", "@input_size"], mode: area}

Each entry names one class of `monai.transforms` with its keyword arguments. A string value that is
exactly "@name" is replaced by the variable `name`; nothing else is evaluated, nothing is imported by path
(no monai.bundle parser, no `$` expressions), so a recipe cannot run code. Only the transforms and arguments of
`medfl.data.safe_transforms` are accepted, so a recipe cannot read or write files beyond its input either.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import monai.transforms
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose, Transform

from medfl.config import load_yaml_mapping
from medfl.data.safe_transforms import check_transform
from medfl.errors import ConfigError

# The shipped recipes are the data package medfl.recipes, which pyproject.toml maps from the repository's
# transforms/ folder: found through the import system, so that a wheel and an editable install both have
# them. medfl is always installed unpacked (torch and MONAI are never imported from a zip): this is a folder.
RECIPES_DIR = Path(importlib.util.find_spec("medfl.recipes").submodule_search_locations[0])
_RECIPE_KEYS = {"description", "variables", "transforms"}
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or `<name>.yaml` among the shipped recipes."""
    path = Path(name_or_path)
    if path.suffix.lower() in (".yaml", ".yml") or path.parent != Path("."):
        return path
    return RECIPES_DIR / f"{name_or_path}.yaml"


def _substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    """Replace "@name" strings by variables; refuse dotted names, which MONAI may import by path."""
    if isinstance(value, str) and _DOTTED.match(value):
        raise ConfigError(f"{where}: '{value}' looks like an import path; recipes name MONAI objects only "
                          "(write dtypes as float32, readers as PILReader)")
    if isinstance(value, str) and value.startswith("@"):
        name = value[1:]
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise ConfigError(f"{where}: unknown variable '{value}' (known: {known})")
        return variables[name]
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    return value


def _transform_class(name: str, where: str) -> type[Transform]:
    candidate = getattr(monai.transforms, name, None) if name.isidentifier() and not name.startswith("_") else None
    if not (isinstance(candidate, type) and issubclass(candidate, Transform)):
        raise ConfigError(f"{where}: '{name}' is not a transform of monai.transforms")
    if issubclass(candidate, Compose):
        raise ConfigError(f"{where}: '{name}' composes transforms; list the transforms themselves instead")
    return candidate


def resolve_recipe(name_or_path: str | Path, **overrides: Any) -> dict[str, Any]:
    """A recipe file read and checked, its variables substituted (keyword arguments override the recipe's
    defaults): {"path", "description", "transforms": [{name: arguments}, ...]}. Nothing is built yet."""
    path = recipe_path(name_or_path)
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise ConfigError(f"{path}: transform recipe not found (shipped recipes: {available})")
    recipe = load_yaml_mapping(path)
    unknown = sorted(set(recipe) - _RECIPE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(_RECIPE_KEYS))})")
    defaults = recipe.get("variables") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: 'variables' must be a mapping of names to values")
    variables = {**_substitute(defaults, {}, f"{path}: variables"), **overrides}
    entries = recipe.get("transforms")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'transforms' must be a non-empty list of transforms")
    transforms = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{path}: transform {number} must be a mapping of one transform name to its arguments")
        name, arguments = next(iter(entry.items()))
        where = f"{path}: transform {number} ({name})"
        arguments = _substitute(arguments if arguments is not None else {}, variables, where)
        if not isinstance(arguments, dict):
            raise ConfigError(f"{where}: arguments must be a mapping of names to values")
        check_transform(str(name), arguments, where)
        transforms.append({str(name): arguments})
    return {"path": path, "description": recipe.get("description", path.stem), "transforms": transforms}


def load_recipe(name_or_path: str | Path, **overrides: Any) -> Compose:
    """Build the Compose a recipe describes; keyword arguments override the recipe's variables."""
    recipe = resolve_recipe(name_or_path, **overrides)
    transforms = []
    for number, entry in enumerate(recipe["transforms"], start=1):
        name, arguments = next(iter(entry.items()))
        where = f"{recipe['path']}: transform {number} ({name})"
        cls = _transform_class(name, where)
        try:
            transforms.append(cls(**arguments))
        except Exception as error:  # noqa: BLE001 - any constructor failure is a bad argument in the recipe
            raise ConfigError(f"{where}: bad arguments ({' '.join(str(error).split())[:200]})") from None
    return Compose(transforms)


def build_dataset(records: list[dict[str, Any]], recipe: Compose, cache_rate: float = 1.0,
                  num_workers: int = 0) -> Dataset:
    """A MONAI dataset over `records`: CacheDataset (filled once, up to the first random transform) when
    cache_rate > 0, else a plain Dataset. `num_workers` threads fill the cache (0: the calling thread).

    The cache is read without a deep copy per item (`copy_cache=False`, a quarter of the per-sample cost at
    32 px): MONAI's dictionary transforms copy the dictionary and return new arrays, so the random tail never
    writes into a cached item (tests/test_data_recipes.py checks the shipped recipes)."""
    if cache_rate > 0:
        return CacheDataset(records, transform=recipe, cache_rate=cache_rate, num_workers=num_workers,
                            progress=False, copy_cache=False)
    return Dataset(records, transform=recipe)
