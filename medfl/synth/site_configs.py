"""Site config YAML for the synthetic sites, in the schema `medfl.config.load_site_config` reads.

The same function writes the configs under `DIR/site_configs/` and the repository's `site_configs/`; only
`data_root` (and a split file's path) differ, being relative to where each config lives.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from medfl.synth.dermoscopy import ISIC_METADATA, SOURCE_LABELS, TABLES
from medfl.synth.lesions import CLASSES
from medfl.synth.prostate import SPLIT_FILE
from medfl.synth.sites import DermSite, ProstateSite

HEADER = "# Site config written by `medfl synth`: facts about one synthetic site's data.\n"


def relative_root(config_dir: Path, data_dir: Path) -> str:
    """`data_dir` relative to `config_dir`, POSIX style, as site configs store it."""
    return Path(os.path.relpath(Path(data_dir).resolve(), Path(config_dir).resolve())).as_posix()


def derm_config(site: DermSite, data_root: str) -> dict:
    """The config of a dermoscopy site whose folder is `data_root` (relative to the config's folder)."""
    kept, others = SOURCE_LABELS[site.layout]
    config: dict = {
        "name": site.name,
        "task": "classification",
        "data_root": data_root,
        "layout": site.layout,
    }
    config["table"] = TABLES[site.layout]
    if site.layout == "isic2019":
        config["metadata_table"] = ISIC_METADATA
    if site.dataset is not None:
        config["filter"] = {"column": "dataset", "values": [site.dataset]}
    config["label_map"] = {**dict(zip(kept, CLASSES, strict=True)), **dict.fromkeys(others)}
    config["split_file"] = None
    return config


def prostate_config(site: ProstateSite, data_root: str) -> dict:
    """The config of a prostate site whose folder is `data_root` (relative to the config's folder)."""
    return {
        "name": site.name,
        "task": "segmentation",
        "data_root": data_root,
        "layout": site.layout,
        "mask_suffix": site.mask_suffix,
        "split_file": f"{data_root}/{SPLIT_FILE}" if site.split_file else None,
    }


def config_yaml(config: dict) -> str:
    """YAML text of a config, keys in schema order."""
    return HEADER + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
