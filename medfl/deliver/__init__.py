"""Deliverables for site administrators: export a run's per-site models, predict with them, score them.

`export_run` writes one folder per site (weights, a torch.export program, the evaluation recipe and a
manifest), or with export_format="bundle" one MONAI bundle per site (medfl.deliver.monai_bundle);
`load_export` reads a medfl export back for `predict` and `evaluate_export`.
"""

from medfl.deliver.bundle import ExportedModel, find_export, load_export, read_manifest, sha256_file
from medfl.deliver.evaluate import evaluate_export
from medfl.deliver.export import SiteExport, export_program, export_run
from medfl.deliver.predict import Prediction, predict

__all__ = [
    "ExportedModel",
    "Prediction",
    "SiteExport",
    "evaluate_export",
    "export_program",
    "export_run",
    "find_export",
    "load_export",
    "predict",
    "read_manifest",
    "sha256_file",
]
