"""3-D inference (exports of runs with data.dims 3): the one transform chain that `medfl predict` and the MONAI
bundle both run, so that their masks are the same voxel for voxel.

The run scored whole volumes with its evaluation recipe (transforms/prostate3d_eval.yaml: load, channel first,
RAS, percentile clip and z-score, resampling to data.spacing, types) and MONAI's sliding-window inference.
Inference runs the same recipe on the image alone (`inference_steps`): steps that name only the label are left
out, per-key arguments keep the image's entry, and the steps that drop MONAI's metadata (`track_meta: false`,
SelectItemsd) keep it, since `Invertd` needs the record of what was applied to put the mask back. The image's
values are those the run scored. Then `SlidingWindowInferer` (windows of the patch, the run's overlap, blending
and windows per batch), argmax, and `Invertd` with nearest interpolation: the resampling and the reorientation
are undone, and the mask lies on the input's own voxel grid (shape, spacing, origin, direction).

Everything here is MONAI's stock components, named as a bundle config names them (`_target_` and arguments),
so the bundle's inference.json holds exactly `inference_steps`' list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from medfl.data.safe_transforms import ALLOWED_TRANSFORMS
from medfl.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from monai.transforms import Compose

# Arguments that MONAI's dictionary transforms take per key (one entry per key, or one for all).
_PER_KEY = ("mode", "padding_mode", "align_corners", "dtype")
_DROPPED = {"SelectItemsd"}  # would drop the metadata Invertd reads; inference records hold the image alone
_NO_META_ARGUMENT = "track_meta"  # EnsureTyped/ToTensord: false drops the metadata; inference keeps MONAI's default


def _listed(keys: Any) -> list[Any]:
    return list(keys) if isinstance(keys, list) else [keys]


def inference_steps(recipe: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's resolved 3-D evaluation recipe as MONAI components for the image alone ({"_target_": name,
    "keys": "image", ...}), the form a bundle config holds and `build_transforms` builds."""
    steps = []
    for number, entry in enumerate(recipe["transforms"], start=1):
        name, arguments = next(iter(entry.items()))
        keys = _listed(arguments.get("keys", []))
        if "image" not in keys or name in _DROPPED:
            continue
        if ALLOWED_TRANSFORMS.get(name) is None or name.startswith("Rand"):
            raise ConfigError(f"the run's 3-D evaluation recipe, transform {number} ({name}): not a deterministic "
                              "allow-listed MONAI transform; 3-D inference cannot carry it")
        step: dict[str, Any] = {"_target_": name}
        for key, value in arguments.items():
            if key == "keys":
                value = "image"
            elif key in _PER_KEY and isinstance(value, list) and len(value) == len(keys) and len(keys) > 1:
                value = value[keys.index("image")]
            elif key == _NO_META_ARGUMENT or key == "allow_missing_keys":
                continue
            step[key] = value
        steps.append(step)
    return steps


def build_transforms(steps: Sequence[Mapping[str, Any]]) -> Compose:
    """`inference_steps` as a MONAI Compose, as MONAI's config parser builds the bundle's `preprocessing`."""
    import monai.transforms

    transforms = []
    for step in steps:
        name = step["_target_"]
        if name not in ALLOWED_TRANSFORMS:
            raise ConfigError(f"'{name}' is not an allow-listed MONAI transform")
        transforms.append(getattr(monai.transforms, name)(**{k: v for k, v in step.items() if k != "_target_"}))
    return monai.transforms.Compose(transforms)


def sliding_window(preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """MONAI's SlidingWindowInferer arguments from an export manifest's `preprocessing` (3-D)."""
    window = preprocessing["sliding_window"]
    return {"roi_size": list(preprocessing["patch_size"]), "sw_batch_size": int(window["sw_batch_size"]),
            "overlap": float(window["sw_overlap"]), "mode": str(window["sw_mode"])}


def predict_volume_mask(network: Callable[[torch.Tensor], torch.Tensor], path: str, steps: Sequence[Mapping[str, Any]],
                        window: Mapping[str, Any], device: torch.device) -> np.ndarray:
    """The mask (uint8 numpy array, the input file's own voxel axes as ITK reads them: x, y, z) of one volume:
    the bundle's pipeline run eagerly (preprocessing, SlidingWindowInferer on a batch of one, argmax, Invertd).
    `network` maps a batch of patches to logits."""
    import torch
    from monai.data import decollate_batch, list_data_collate
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import AsDiscreted, Compose, Invertd

    preprocessing = build_transforms(steps)
    batch = list_data_collate([preprocessing({"image": path})])
    inputs = batch["image"].to(device)
    with torch.inference_mode():
        logits = SlidingWindowInferer(**window)(inputs, network)
    item = decollate_batch({"image": inputs, "pred": logits}, detach=True)[0]
    post = Compose([AsDiscreted(keys="pred", argmax=True),
                    Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True)])
    mask = post(item)["pred"]
    return torch.as_tensor(mask).as_subclass(torch.Tensor)[0].round().to(torch.uint8).cpu().numpy()
