"""`medfl export`: turn a run folder into one deliverable folder per site, in one of two formats.

"medfl" (the default, what `medfl predict` and `medfl evaluate` read): `<out>/<site>/` holds the chosen
model's state dict (`model.pt`, loads with torch.load(weights_only=True)), a torch.export program returning
logits with a dynamic batch size (`model.pt2`, loads with torch.export.load without medfl), the resolved
evaluation recipe (`eval_transforms.yaml`) and `manifest.json` (what it is, how it was trained and scored,
how to feed it, sha256 of every file).
"bundle": `<out>/<site>/` is a MONAI bundle that `python -m monai.bundle run` runs without medfl
(medfl.deliver.monai_bundle).
A site's folder is assembled in a hidden temporary folder and renamed into place (medfl.checkpoints.atomic_folder;
files and folders get the umask's permissions); an existing export is never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfl import __version__
from medfl.checkpoints import atomic_folder, atomic_write_bytes, atomic_write_json
from medfl.deliver.bundle import FORMAT, MANIFEST, PROGRAM, RECIPE, WEIGHTS
from medfl.deliver.provenance import (
    ROLES,
    RunRecord,
    choose_round,
    files_sha256,
    parse_round,
    read_run,
    recipe_yaml,
    resolved_eval_recipe,
    round_metrics,
)
from medfl.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medfl.tasks import Task

FORMATS = ("medfl", "bundle")
DEFAULT_OUT = {"medfl": "export", "bundle": "bundle"}  # default export folder inside the run folder
FILES_RULE = "sha256 of the sorted training file paths (relative to data_root), UTF-8, one per line, each ending in \\n"


def export_program(network: nn.Module, in_channels: int, input_size: int | Sequence[int]) -> torch.export.ExportedProgram:
    """torch.export of the network in eval mode: (batch, C, S, S) float32 -> logits, any batch size; with the
    spatial size as a list (a 3-D network's patch), (batch, C, *size)."""
    # start-up: torch loads only when a model is exported (the command checks its arguments first)
    import torch

    from medfl.deliver.programs import LogitsOnly

    wrapper = LogitsOnly(network).eval()
    spatial = [input_size, input_size] if isinstance(input_size, int) else [int(edge) for edge in input_size]
    example = torch.zeros(2, in_channels, *spatial)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(wrapper, (example,), dynamic_shapes={"x": {0: batch}})


def _saved_bytes(save: Callable[[Any, io.BytesIO], None], obj: Any) -> bytes:
    buffer = io.BytesIO()
    save(obj, buffer)
    return buffer.getvalue()


@dataclass
class SiteExport:
    """One written export: the site, its folder and its manifest."""

    site: str
    folder: Path
    manifest: dict[str, Any]


def _versions() -> dict[str, str]:
    import monai
    import torch

    return {"medfl": __version__, "monai": monai.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def _trained_on(run: RunRecord, site: str) -> list[str]:
    """The training files a site's model learnt from: its own; for pooled training every site's, in run order."""
    sites = list(run.summary["sites"]) if run.config.spec.pools_data else [site]
    return [name for each in sites for name in run.files.site(each).record.training_files]


def _site_manifest(run: RunRecord, site: str, checkpoint: dict[str, Any], role: str, key: str,
                   request: str | int, round_: int, recipe: dict[str, Any], task: Task) -> dict[str, Any]:
    """Everything but the file hashes: the manifest's description of one site's model."""
    config, network = run.config, checkpoint["network"]
    size, channels = config.data.input_size, int(network["in_channels"])
    spatial = [int(edge) for edge in task.network_input_size(config.data)]  # [S, S]; a 3-D network's patch
    record = run.files.site(site).record
    files = _trained_on(run, site)
    logits = task.logits_shape(config.classes, size)
    return {
        "format": FORMAT,
        "site": site,
        "task": config.task,
        "classes": config.classes,
        "model": {"role": role, "name": key, "method": config.method},
        "network": network,
        "input": {"channels": channels, "size": spatial, "dtype": "float32", "shape": ["batch", channels, *spatial]},
        "output": {"logits": logits, "probabilities": "softmax over axis 1"},
        "preprocessing": {**task.preprocessing(config.data, channels, recipe),
                          **record.inputs},
        "round": {"requested": request, "selected": round_, "completed_rounds": run.completed_rounds,
                  "rounds": config.rounds, "run_finished": bool(run.summary.get("finished"))},
        "metrics": {"metric": run.summary["metric"], **round_metrics(run, site, key, round_)},
        "experiment": {"name": config.name, "method": config.method, "seed": config.seed,
                       "config_sha256": run.config_sha256, "run_dir": str(run.folder.resolve()),
                       "sites": list(run.summary["sites"])},
        "training_files": {"count": len(files), "sha256": files_sha256(files), "rule": FILES_RULE},
        "data_settings": config.resolved()["data"],  # as config.yaml: a 2-D run's without the 3-D keys
        "program": {"file": PROGRAM, "dynamic_batch": True,
                    "usage": "torch.export.load('model.pt2').module()(x) -> logits"},
        "versions": _versions(),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_site(staging: Path, network: nn.Module, manifest: dict[str, Any], recipe: dict[str, Any]) -> None:
    """Write the four files of one site's export into `staging`; the manifest last, with every file's sha256."""
    import torch

    program = export_program(network, manifest["input"]["channels"], manifest["input"]["size"])
    contents = {
        WEIGHTS: _saved_bytes(torch.save, network.state_dict()),
        PROGRAM: _saved_bytes(torch.export.save, program),
        RECIPE: recipe_yaml(recipe).encode("utf-8"),
    }
    for name, data in contents.items():
        atomic_write_bytes(staging / name, data)
    manifest["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    atomic_write_json(staging / MANIFEST, manifest)


def export_site(run: RunRecord, site: str, out: Path, role: str, request: str | int,
                export_format: str = "medfl", *, task: Task) -> SiteExport:
    """Export one site's model of the requested round into `out/<site>` (which must not exist), in `export_format`.

    Reads the run folder only: the run's record and this site's own part, never a site config or data."""
    used = run.config.spec.used_role.value
    key = used if role == "personalized" else run.config.spec.receiving_role.value
    round_ = choose_round(run, site, key, used, request)  # a round that does not exist: before torch loads
    from medfl.models import build_model  # start-up: torch and MONAI load once the round is known to exist

    checkpoint = run.files.site(site).load_round_models(round_)
    network = build_model(**checkpoint["network"])
    network.load_state_dict(checkpoint["models"][key])
    network.eval()
    recipe = resolved_eval_recipe(run.config, task.recipe_variables(run.config.data))
    manifest = _site_manifest(run, site, checkpoint, role, key, request, round_, recipe, task)
    target = out / site
    with atomic_folder(target) as staging:
        if export_format == "bundle":
            # start-up: MONAI's bundle tools load only when a bundle is written
            from medfl.deliver.monai_bundle import write_bundle

            manifest["files"] = write_bundle(staging, network, manifest, recipe, task)
        else:
            _write_site(staging, network, manifest, recipe)
        if target.exists():
            raise ConfigError(f"{target} appeared while exporting: an export is never overwritten")
    return SiteExport(site, target, manifest)


def _check_site_part(run: RunRecord, site: str) -> None:
    """Refuse, before anything is written, a site whose own part of the run is not in this folder."""
    folder = run.files.site(site)
    if not folder.root.is_dir():
        raise ConfigError(f"{run.folder}: site '{site}' keeps its part of the run elsewhere (no {folder.root}); "
                          "export it where its models are (under NVFlare: at the site, from its own run folder)")
    folder.record  # noqa: B018 - a folder without the site's record is refused in one line


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    round_: str | int = "best",
    role: str = "personalized",
    sites: Sequence[str] | None = None,
    on_site: Callable[[SiteExport], None] | None = None,
    export_format: str = "medfl",
    *,
    task: Task,
) -> list[SiteExport]:
    """Export every site (or `sites`) of a run into `out` (default RUN_DIR/export, or RUN_DIR/bundle for
    bundles), one folder per site.

    `round_`: "best" (the run's selection), "last" or a round number. `role`: "personalized" (the model the
    site uses: P, or M for one-model methods) or "deputy" (the model shared with the federation: D, or M).
    `export_format`: "medfl" (the files `medfl predict` reads) or "bundle" (a MONAI bundle per site).
    `task`: the run's task (the caller turns the run's key into it).
    Refuses, before writing anything, when a site's folder already exists.
    """
    if export_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not '{export_format}'")
    if role not in ROLES:
        raise ConfigError(f"--model must be one of {', '.join(ROLES)}, not '{role}'")
    request = parse_round(round_)
    run = read_run(run_dir)
    if run.config.task != task.key:
        raise ConfigError(f"{run.folder}: a {run.config.task} run cannot be exported as a {task.key} one")
    if role == "deputy" and not run.config.spec.communicates:
        raise ConfigError(f"{run.folder}: method '{run.config.method}' shares no model with a federation: "
                          "there is no deputy to export")
    recorded = list(run.summary["sites"])  # the run's record: a hospital's folder holds its own site only
    names = list(dict.fromkeys(sites)) if sites else recorded
    unknown = [name for name in names if name not in recorded]
    if unknown:
        raise ConfigError(f"{run.folder}: no site '{unknown[0]}' in this run (sites: {', '.join(recorded)})")
    for name in names:
        _check_site_part(run, name)
    out = Path(out) if out is not None else run.folder / DEFAULT_OUT[export_format]
    taken = [str(out / name) for name in names if (out / name).exists()]
    if taken:
        verb = "exists" if len(taken) == 1 else "exist"
        raise ConfigError(f"{', '.join(taken)} already {verb}: an export is never overwritten; "
                          "choose another folder with --out, or remove the old export")
    exports = []
    for name in names:
        exports.append(export_site(run, name, out, role, request, export_format, task=task))
        if on_site is not None:
            on_site(exports[-1])
    return exports
