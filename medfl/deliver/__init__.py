"""Deliverables for site administrators: export a run's per-site models, predict with them, score them.

`export_run` writes one folder per site (weights, a torch.export program, the evaluation recipe and a
manifest), or with export_format="bundle" one MONAI bundle per site (medfl.deliver.monai_bundle);
`load_export` reads a medfl export back for `predict` and `evaluate_export`.

The names below are imported when first used, so that a command can find an export and read its manifest
(medfl.deliver.bundle, medfl.deliver.inputs) before torch and MONAI load. `from medfl.deliver import predict`
is the function (import it from here, not from medfl.deliver.predict first).
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "ExportedModel": "bundle", "find_export": "bundle", "load_export": "bundle", "read_manifest": "bundle",
    "sha256_file": "bundle", "evaluate_export": "evaluate", "SiteExport": "export", "export_program": "export",
    "export_run": "export", "Prediction": "inputs", "predict": "predict",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'medfl.deliver' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"medfl.deliver.{_MODULES[name]}"), name)
    globals()[name] = value  # kept, and `predict` the function rather than the module its import just bound
    return value
