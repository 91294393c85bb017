"""`medfl export --format bundle`: one site's model as a MONAI bundle that runs without medfl.

    <site>/configs/metadata.json    MONAI's metadata (schema meta_schema_20240725) plus the site, classes,
                                    round, scores, method, weights' sha256 and the papers
    <site>/configs/inference.json   `python -m monai.bundle run`: stock MONAI transforms, engine and writers
    <site>/models/model.ts          TorchScript: dermoscopy images -> logits; MRI volumes -> logits (slice-wise)
    <site>/models/model.pt          the medfl network's state dict (the file MONAI's bundle format requires)
    <site>/docs/README.md           what the model is, its scores, its intended use, the exact commands

The configs name MONAI components and a handful of `$` expressions the bundle format needs (list the input
folder, build the data list, choose the device, find the model file, run the engine) and the bundle's own
checks: the model file's sha256 against the one metadata.json records (MONAI's `check_hash`) before it is
loaded, the site's masks left out of an input folder (segmentation), every input an RGB JPEG or PNG before
anything is predicted (classification). A failed check stops the run with one line (sys.exit). They read
only the input folder and the bundle's files and write only into the output folder that the user passes, and
the recipe values copied into them are refused when MONAI's config parser would read them as code or
references.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medfl.checkpoints import atomic_write_bytes, atomic_write_text
from medfl.data.safe_transforms import ALLOWED_TRANSFORMS
from medfl.data.volumes import WORKING_ORIENTATION
from medfl.deliver.programs import INTENSITY_STEPS, LogitsOnly
from medfl.errors import ConfigError
from medfl.manifests import (
    BUNDLE_INFERENCE,
    BUNDLE_METADATA,
    BUNDLE_PROGRAM,
    BUNDLE_README,
    BUNDLE_WEIGHTS,
    check_manifest,
)

if TYPE_CHECKING:
    from medfl.tasks import Task

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
# The keys MONAI's bundle specification (docs/source/mb_specification.rst) makes mandatory in metadata.json,
# and in every tensor format specifier of network_data_format.
REQUIRED_METADATA_KEYS = ("version", "monai_version", "pytorch_version", "numpy_version",
                          "required_packages_version", "task", "description", "authors", "copyright",
                          "network_data_format")
REQUIRED_TENSOR_KEYS = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                        "is_patch_data", "channel_def")
METADATA, INFERENCE, PROGRAM, WEIGHTS, README = (BUNDLE_METADATA, BUNDLE_INFERENCE, BUNDLE_PROGRAM, BUNDLE_WEIGHTS,
                                                  BUNDLE_README)
BUNDLE_VERSION = "1.0.0"
REFERENCES = [
    "Chen Z, Yang C, Zhu M, Peng Z, Yuan Y. Personalized Retrogress-Resilient Framework for Real-World Medical "
    "Federated Learning. MICCAI 2021. arXiv:2110.00394. https://arxiv.org/abs/2110.00394",
    "Chen Z, Yang C, Zhu M, Peng Z, Yuan Y. Personalized Retrogress-Resilient Federated Learning Toward "
    "Imbalanced Medical Data. IEEE Transactions on Medical Imaging 41(12), 2022.",
]
# pip name -> lowest version medfl's [bundle] extra allows; the metadata names the installed version.
RUNNER_PACKAGES = {"pytorch-ignite": "0.4.11", "fire": "0.5.0"}
_CONFIG_MARKERS = ("$", "@", "%")  # what MONAI's config parser evaluates, references or imports
_CONFIG_KEYS = ("_target_", "_requires_", "_disabled_", "_desc_", "_mode_")


# ----------------------------------------------------------------------------------------------------- models

def quiet_jit(function, *args, **kwargs):
    """Run a torch.jit function without its deprecation notices (TorchScript is what MONAI bundles load) and
    without the tracer's notices about shape checks (MONAI's norms compare channel counts); `bundle_program`
    checks the result on other inputs instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated.*")
        return function(*args, **kwargs)


def bundle_program(network: nn.Module, task: Task, in_channels: int, input_size: int | list[int],
                   context_slices: int = 0) -> torch.jit.ScriptModule:
    """The bundle's TorchScript network: the traced logits network (B, C, S, S) -> logits, which the task may
    wrap (segmentation: SliceWiseProgram, (1, 1, Z, Y, X) preprocessed volume -> (1, K, Z, Y, X) logits); with the
    spatial size as a list (a 3-D network's patch), traced on (B, C, *size). Checked against the eager network
    (another batch size, another volume shape) before it is used."""
    generator = torch.Generator().manual_seed(0)
    logits = LogitsOnly(network).eval()
    spatial = [input_size, input_size] if isinstance(input_size, int) else list(input_size)
    example = torch.rand(2, in_channels, *spatial, generator=generator)
    traced = quiet_jit(torch.jit.trace, logits, example)
    program, eager, probe = task.bundle_program(traced, logits, in_channels, spatial[0], context_slices, generator)
    program.eval()
    with torch.no_grad():
        expected, got = eager(probe), program(probe)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
        raise RuntimeError("the TorchScript program does not reproduce the network; the bundle was not written")
    return program


def _saved(save, obj: Any) -> bytes:
    buffer = io.BytesIO()
    save(obj, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- configs

def _config_value(value: Any, where: str) -> Any:
    """A recipe value, refused where MONAI's config parser would not take it as plain data."""
    if isinstance(value, str) and value.startswith(_CONFIG_MARKERS):
        raise ConfigError(f"{where}: value '{value}' starts with '{value[0]}', which a MONAI bundle config would "
                          "evaluate or resolve; a bundle cannot carry it")
    if isinstance(value, list):
        return [_config_value(item, where) for item in value]
    if isinstance(value, dict):
        bad = [key for key in value if key in _CONFIG_KEYS]
        if bad:
            raise ConfigError(f"{where}: key '{bad[0]}' has a meaning in MONAI bundle configs; a bundle cannot carry it")
        return {key: _config_value(item, where) for key, item in value.items()}
    return value


def _listed(keys: Any) -> list[Any]:
    return list(keys) if isinstance(keys, list) else [keys]


def image_transforms(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's evaluation recipe as bundle config components. Bundle records hold only `image` and
    `filename_or_obj` (the CSV writer's key), so steps that also name medfl's record keys (label, id, site)
    skip those, and SelectItemsd keeps `filename_or_obj`."""
    components = []
    for number, entry in enumerate(recipe["transforms"], start=1):
        name, arguments = next(iter(entry.items()))
        arguments = _config_value(dict(arguments), f"evaluation recipe, transform {number} ({name})")
        keys = _listed(arguments.get("keys", []))
        if name == "SelectItemsd":
            arguments["keys"] = keys + ["filename_or_obj"]
        if keys != ["image"] and "allow_missing_keys" in ALLOWED_TRANSFORMS.get(name, ()):
            arguments["allow_missing_keys"] = True
        components.append({"_target_": name, **arguments})
    return components


# Steps of a segmentation recipe that only set types (the slice program's input is float32 already).
_TYPE_ONLY = {"EnsureTyped", "ToTensord", "CastToTyped", "SelectItemsd"}


def _image_dtype(arguments: dict[str, Any]) -> Any:
    """The dtype a recipe step gives the `image` item (per-key dtype lists follow the keys), or None."""
    keys, dtype = _listed(arguments.get("keys", [])), arguments.get("dtype")
    if "image" not in keys or not isinstance(dtype, list):
        return dtype if "image" in keys else None
    return dtype[keys.index("image")] if len(dtype) == len(keys) else dtype


def volume_transforms(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """The volume preprocessing as bundle config components: read (ITK, as medfl reads geometry), channel
    first, working orientation (LPS, with MONAI's RAS labels stated), axes to (Z, Y, X) as the data layer holds
    them, then INTENSITY_STEPS.

    The run's slice recipe is applied by medfl after this preprocessing; a bundle can carry it only when it
    sets types alone and leaves images float32 (as the shipped prostate recipe does): the slices exist only
    inside the program, whose input is float32."""
    for entry in recipe["transforms"]:
        name, arguments = next(iter(entry.items()))
        if name not in _TYPE_ONLY or _image_dtype(arguments) not in (None, "float32"):
            raise ConfigError(f"the run's slice evaluation recipe applies {name} {arguments} to the preprocessed "
                              "slices; a MONAI bundle can only carry slice recipes that set types and keep images "
                              "float32 (EnsureTyped, CastToTyped)")
    return [
        {"_target_": "LoadImaged", "keys": "image", "reader": "ITKReader", "image_only": True, "dtype": "float32"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": WORKING_ORIENTATION,
         "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
        {"_target_": "Transposed", "keys": "image", "indices": [0, 3, 2, 1]},
        *({"_target_": f"{name}d", "keys": "image", **args} for name, args in INTENSITY_STEPS),
    ]


def inference_config(manifest: dict[str, Any], recipe: dict[str, Any], task: Task) -> dict[str, Any]:
    """configs/inference.json: a SupervisedEvaluator over the files of `input_dir`, writing into `output_dir`.

    `models/model.ts` is loaded only after MONAI's `check_hash` has found it equal to the sha256 that
    `configs/metadata.json` records; otherwise the run stops with one line (sys.exit) before anything is read
    or written. The task's `input_report` runs first: it says which files are left out, or stops the run on
    an input that cannot be predicted."""
    part = task.bundle_inference(recipe, manifest)
    inferer = part.pop("inferer", {"_target_": "SimpleInferer"})  # 3-D: SlidingWindowInferer over patches
    config: dict[str, Any] = {
        "imports": ["$import glob", "$import os", "$import sys", "$from monai.apps.utils import check_hash",
                    *part.pop("imports")],
        "bundle_root": ".",
        "input_dir": None,
        "output_dir": None,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "model_file": f"$os.path.join(@bundle_root, {_python_path(PROGRAM)})",
        "metadata_file": f"$os.path.join(@bundle_root, {_python_path(METADATA)})",
        "model_sha256": f"$(monai.bundle.ConfigParser.load_config_file(@metadata_file) if os.path.isfile("
                        f"@metadata_file) else {{}}).get('sha256', {{}}).get('{PROGRAM}')",
        "checked_model_file": "$@model_file if @model_sha256 and check_hash(@model_file, @model_sha256, 'sha256') "
                              "else sys.exit(@model_file + (': not found' if not os.path.isfile(@model_file) else "
                              "': differs from the sha256 that ' + @metadata_file + ' records: the model file is "
                              "damaged or was replaced' if @model_sha256 else ': ' + @metadata_file + ' records no "
                              "sha256 of it') + '; nothing was run (export the bundle again)')",
        "network_def": {"_target_": "torch.jit.load", "f": "@checked_model_file", "map_location": "cpu"},
        "network": "$@network_def.to(@device)",
    }
    config |= part
    config |= {
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": task.bundle_batch_size,
                       "shuffle": False, "num_workers": 0},
        "inferer": inferer,
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@input_report", "$@evaluator.run()"],
    }
    return config


def _python_path(name: str) -> str:
    """`models/model.ts` as the arguments of os.path.join: 'models', 'model.ts'."""
    return ", ".join(f"'{part}'" for part in name.split("/"))


# --------------------------------------------------------------------------------------------------- metadata

def _finite(value: Any) -> Any:
    """NaN scores (a metric undefined on a split) as null, so that metadata.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def required_packages(task: Task) -> dict[str, str]:
    """What the bundle runner needs beyond MONAI and torch, at the installed version (else the lowest allowed)."""
    packages = {**RUNNER_PACKAGES, **task.bundle_packages}
    versions = {}
    for name, lowest in packages.items():
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = lowest
    return versions


def tensor_format(kind: str, fmt: str, modality: str, channels: int, shape: list[Any], dtype: str,
            value_range: list[Any], channel_def: dict[str, str]) -> dict[str, Any]:
    return {"type": kind, "format": fmt, "modality": modality, "num_channels": channels, "spatial_shape": shape,
            "dtype": dtype, "value_range": value_range, "is_patch_data": False, "channel_def": channel_def}


def network_data_format(manifest: dict[str, Any], task: Task) -> dict[str, Any]:
    """Inputs and outputs of models/model.ts, and the outputs after the config's postprocessing."""
    return task.bundle_data_format(manifest)


def metadata(manifest: dict[str, Any], hashes: dict[str, str], task: Task) -> dict[str, Any]:
    """configs/metadata.json from the export manifest (everything medfl knows about the model)."""
    import monai
    import numpy

    key, site, versions = manifest["task"], manifest["site"], manifest["versions"]
    experiment, round_ = manifest["experiment"], manifest["round"]
    texts = task.bundle_texts(manifest)
    what = texts["what"]
    return {
        "schema": SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by medfl {versions['medfl']} from experiment "
                                      f"'{experiment['name']}', round {round_['selected']}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": required_packages(task),
        "name": f"medfl {key} model of site {site}",
        "task": what[0].upper() + what[1:],
        "description": (f"The {manifest['model']['role']} model ({manifest['model']['name']}) of site '{site}', "
                        f"trained by federated learning with method '{manifest['model']['method']}' in experiment "
                        f"'{experiment['name']}' (medfl), exported at round {round_['selected']} "
                        f"({round_['requested']} requested)."),
        "authors": f"the federation of experiment '{experiment['name']}' (exported with medfl {versions['medfl']})",
        "copyright": f"the institutions of the federation of experiment '{experiment['name']}'",
        "intended_use": "Research only. Not a medical device; not for diagnosis or any clinical decision.",
        "data_source": f"site '{site}': {manifest['training_files']['count']} training files "
                       f"(sha256 of their list {manifest['training_files']['sha256']})",
        "data_type": texts["data_type"],
        "references": REFERENCES,
        "network_data_format": network_data_format(manifest, task),
        "site": site,
        "medfl_task": key,
        "class_names": manifest["classes"],
        "method": manifest["model"]["method"],
        "model": manifest["model"],
        "round": round_,
        "eval_metrics": _finite(manifest["metrics"]),
        "sha256": hashes,
        "network": manifest["network"],
        "preprocessing": manifest["preprocessing"],
        "experiment": experiment,
        "training_files": manifest["training_files"],
        "data_settings": manifest["data_settings"],
        "versions": versions,
        "exported_at": manifest["exported_at"],
    }


# ----------------------------------------------------------------------------------------------------- README

def _score(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _input_size(size: list[int]) -> str:
    """`64` for a 2-D network's 64 x 64 input; `16 x 16 x 8 voxels (patches)` for a 3-D network's patch."""
    return str(size[0]) if len(size) == 2 else " x ".join(str(edge) for edge in size) + " voxels (patches)"


def readme(manifest: dict[str, Any], meta: dict[str, Any], config: dict[str, Any], task: Task) -> str:
    """docs/README.md: what the model is, how it was trained and scored, its use, the exact commands."""
    site, round_ = manifest["site"], manifest["round"]
    scores = manifest["metrics"]
    names = sorted(set(scores["validation"]) | set(scores["test"]))
    table = "\n".join(f"| {name} | {_score(scores['validation'].get(name))} | {_score(scores['test'].get(name))} |"
                      for name in names)
    packages = " ".join(f"{name}=={version}" for name, version in meta["required_packages_version"].items())
    texts = task.bundle_texts(manifest)
    io_text, formats = texts["io"], texts["formats"]
    steps = "\n".join(f"- {step['_target_']}" + "".join(
        f", {key}={json.dumps(value)}" for key, value in step.items() if key not in ("_target_", "keys"))
        for step in config["preprocessing"]["transforms"])
    program = texts["program"]
    return f"""# {meta['name']}

{meta['description']}

**Intended use: research only.** This model is not a medical device and must not be used for diagnosis or
any clinical decision.

## The model
- Task: {meta['task']}; classes in order: {', '.join(manifest['classes'])}.
- Network: {manifest['network']['name']} ({manifest['input']['channels']} input channels, input size
  {_input_size(manifest['input']['size'])}), trained by federated learning across the federation's sites with method
  `{manifest['model']['method']}` (experiment '{manifest['experiment']['name']}', {round_['rounds']} rounds planned, {round_['completed_rounds']} completed). This is site '{site}''s
  {manifest['model']['role']} model ({manifest['model']['name']}) at round {round_['selected']}.
- Trained on {manifest['training_files']['count']} files of site '{site}'.
- Weights: `models/model.ts` (TorchScript, what the bundle runs; sha256 {meta['sha256'][PROGRAM]}) and
  `models/model.pt` (the medfl network's state dict; sha256 {meta['sha256'][WEIGHTS]}).

## Scores at round {round_['selected']} (site '{site}', as the run recorded them)
| metric | validation | test |
| --- | --- | --- |
{table}

## Use it
Install MONAI, PyTorch and the runner's packages (medfl is not needed):

    pip install monai=={meta['monai_version']} torch=={meta['pytorch_version']} {packages}

From this folder:

    python -m monai.bundle run --config_file configs/inference.json --input_dir INPUT_FOLDER --output_dir OUTPUT_FOLDER
    python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json

From elsewhere, give the paths and add `--bundle_root THIS_FOLDER`.
{formats}
{io_text} The configs read nothing but the input folder and this bundle's files, and write nothing outside the
output folder (files of the same name there are replaced).

Before `models/model.ts` is loaded, the run checks it against the sha256 that `configs/metadata.json` records
(MONAI's `check_hash`) and stops with one line if it differs: the file was damaged or replaced. `medfl verify
THIS_FOLDER`, where medfl is installed, checks every file the metadata lists. This catches accidents, not
someone who rewrites the metadata too.

## Preprocessing (the site's evaluation preprocessing, as in training)
{steps}

Then {program}.

## References
{chr(10).join(f'- {reference}' for reference in REFERENCES)}
"""


# ------------------------------------------------------------------------------------------------------ write

def write_bundle(folder: Path, network: nn.Module, manifest: dict[str, Any], recipe: dict[str, Any],
                 task: Task) -> dict[str, str]:
    """Write one site's bundle into `folder` (empty) for the site's task; returns the sha256 of every file but
    metadata.json."""
    check_manifest(manifest, f"the manifest of site '{manifest.get('site')}'")
    context = int(manifest["preprocessing"].get("context_slices", 0))
    config = inference_config(manifest, recipe, task)
    size = manifest["input"]["size"]
    program = bundle_program(network, task, manifest["input"]["channels"], size[0] if len(size) == 2 else size, context)
    contents = {
        PROGRAM: quiet_jit(_saved, torch.jit.save, program),
        WEIGHTS: _saved(torch.save, network.state_dict()),
        INFERENCE: (json.dumps(config, indent=2) + "\n").encode("utf-8"),
    }
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    meta = metadata(manifest, hashes, task)
    contents[README] = readme(manifest, meta, config, task).encode("utf-8")
    meta["sha256"][README] = hashlib.sha256(contents[README]).hexdigest()
    for name, data in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / name, data)
    (folder / METADATA).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / METADATA, json.dumps(meta, indent=2) + "\n")
    return meta["sha256"]
