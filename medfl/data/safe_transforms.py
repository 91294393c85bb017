"""The MONAI transforms a recipe may name, and the arguments each may take.

A recipe comes from a file (a shipped recipe, an experiment's `data.*_recipe`, an export's
eval_transforms.yaml, a run folder's config.yaml), and a file may have been written by someone else. Every
transform listed here works on the arrays of its input record and nothing else: it neither reads nor writes
files (LoadImaged reads the record's own `image` file, and a 3-D record's mask, with an image reader named
below), takes no callable and no file name, and passes no free keyword arguments on to other code (MONAI's `**kwargs` reach readers,
`numpy.load` or `numpy.pad`; none is allowed). So no SaveImage*, no Lambda*, no `reader: open` (MONAI
imports a reader by name, and `open` is a name), no `select_fn`, no `pad_kwargs`.

Values must be plain YAML data (strings, numbers, booleans, null, lists and mappings of them): MONAI reads
the strings it gets here as mode, dtype or device names, or as dictionary keys. No string may start with `$` or
`%`, which MONAI's config parser evaluates as Python or resolves as a macro: nothing in a recipe is evaluated,
such a value would only fail on every image, and an export could not carry it into a MONAI bundle.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from medfl.errors import ConfigError

_KEYS = frozenset({"keys", "allow_missing_keys"})
_SPATIAL = _KEYS | {"lazy"}
_SAMPLING = frozenset({"mode", "padding_mode", "align_corners", "dtype"})

# Transform name -> the arguments it may take. Each entry is a pure array operation on the input record.
ALLOWED_TRANSFORMS: dict[str, frozenset[str]] = {
    # Reading the input: only the record's `image` file, only with an image reader (see LOAD_READERS).
    "LoadImaged": _KEYS | {"reader", "dtype", "meta_keys", "meta_key_postfix", "overwriting", "image_only",
                           "ensure_channel_first", "simple_keys", "prune_meta_pattern", "prune_meta_sep",
                           "expanduser"},
    # Types, dictionary items and axes.
    "EnsureChannelFirstd": _KEYS | {"strict_check", "channel_dim"},
    "EnsureTyped": _KEYS | {"data_type", "dtype", "device", "wrap_sequence", "track_meta"},
    "ToTensord": _KEYS | {"dtype", "device", "wrap_sequence", "track_meta"},
    "CastToTyped": _KEYS | {"dtype"},
    "SelectItemsd": _KEYS,
    "DeleteItemsd": frozenset({"keys", "sep", "use_re"}),
    "CopyItemsd": _KEYS | {"times", "names"},
    "ConcatItemsd": _KEYS | {"name", "dim"},
    "SqueezeDimd": _KEYS | {"dim", "update_meta"},
    "RepeatChanneld": _KEYS | {"repeats"},
    "Transposed": _KEYS | {"indices"},
    "AsChannelLastd": _KEYS | {"channel_dim"},
    # Geometry.
    "Orientationd": _SPATIAL | {"axcodes", "as_closest_canonical", "labels"},
    "Spacingd": _SPATIAL | {"pixdim", "diagonal", "mode", "padding_mode", "align_corners", "dtype", "scale_extent",
                            "recompute_affine", "min_pixdim", "max_pixdim", "ensure_same_shape"},
    "RandCropByPosNegLabeld": _SPATIAL | {"label_key", "spatial_size", "pos", "neg", "num_samples", "image_key",
                                          "image_threshold", "fg_indices_key", "bg_indices_key", "allow_smaller"},
    "Resized": _SPATIAL | {"spatial_size", "size_mode", "mode", "align_corners", "anti_aliasing",
                           "anti_aliasing_sigma", "dtype"},
    "Flipd": _SPATIAL | {"spatial_axis"},
    "RandFlipd": _SPATIAL | {"prob", "spatial_axis"},
    "Rotate90d": _SPATIAL | {"k", "spatial_axes"},
    "RandRotate90d": _SPATIAL | {"prob", "max_k", "spatial_axes"},
    "Rotated": _SPATIAL | _SAMPLING | {"angle", "keep_size", "rotate_order"},
    "RandRotated": _SPATIAL | _SAMPLING | {"range_x", "range_y", "range_z", "prob", "keep_size"},
    "Zoomd": _SPATIAL | _SAMPLING | {"zoom", "keep_size"},
    "RandZoomd": _SPATIAL | _SAMPLING | {"prob", "min_zoom", "max_zoom", "keep_size"},
    "Affined": _SPATIAL | _SAMPLING | {"rotate_params", "shear_params", "translate_params", "scale_params",
                                       "affine", "spatial_size", "device", "rotate_order"},
    "RandAffined": _SPATIAL | {"spatial_size", "prob", "rotate_range", "shear_range", "translate_range",
                               "scale_range", "mode", "padding_mode", "cache_grid", "device"},
    "Rand2DElasticd": _KEYS | {"spacing", "magnitude_range", "spatial_size", "prob", "rotate_range", "shear_range",
                               "translate_range", "scale_range", "mode", "padding_mode", "device"},
    "RandGridDistortiond": _KEYS | {"num_cells", "prob", "distort_limit", "mode", "padding_mode", "device"},
    "CenterSpatialCropd": _SPATIAL | {"roi_size"},
    "RandSpatialCropd": _SPATIAL | {"roi_size", "max_roi_size", "random_center", "random_size"},
    "SpatialPadd": _SPATIAL | {"spatial_size", "method", "mode"},
    "DivisiblePadd": _SPATIAL | {"k", "mode", "method"},
    "ResizeWithPadOrCropd": _SPATIAL | {"spatial_size", "mode", "method"},
    "CropForegroundd": _SPATIAL | {"source_key", "channel_indices", "margin", "allow_smaller", "k_divisible", "mode",
                                   "start_coord_key", "end_coord_key"},
    # Intensity.
    "ScaleIntensityd": _KEYS | {"minv", "maxv", "factor", "channel_wise", "dtype"},
    "ScaleIntensityRanged": _KEYS | {"a_min", "a_max", "b_min", "b_max", "clip", "dtype"},
    "ScaleIntensityRangePercentilesd": _KEYS | {"lower", "upper", "b_min", "b_max", "clip", "relative",
                                                "channel_wise", "dtype"},
    "NormalizeIntensityd": _KEYS | {"subtrahend", "divisor", "nonzero", "channel_wise", "dtype"},
    "ThresholdIntensityd": _KEYS | {"threshold", "above", "cval"},
    "ClipIntensityPercentilesd": _KEYS | {"lower", "upper", "sharpness_factor", "channel_wise", "dtype"},
    "HistogramNormalized": _KEYS | {"num_bins", "min", "max", "mask_key", "dtype"},
    "AdjustContrastd": _KEYS | {"gamma", "invert_image", "retain_stats"},
    "RandAdjustContrastd": _KEYS | {"prob", "gamma", "invert_image", "retain_stats"},
    "RandScaleIntensityd": _KEYS | {"factors", "prob", "channel_wise", "dtype"},
    "RandShiftIntensityd": _KEYS | {"offsets", "safe", "factor_key", "meta_keys", "meta_key_postfix", "prob",
                                    "channel_wise"},
    "RandStdShiftIntensityd": _KEYS | {"factors", "prob", "nonzero", "channel_wise", "dtype"},
    "RandGaussianNoised": _KEYS | {"prob", "mean", "std", "dtype", "sample_std"},
    "RandRicianNoised": _KEYS | {"prob", "mean", "std", "channel_wise", "relative", "sample_std", "dtype"},
    "GaussianSmoothd": _KEYS | {"sigma", "approx"},
    "RandGaussianSmoothd": _KEYS | {"sigma_x", "sigma_y", "sigma_z", "approx", "prob"},
    "RandGaussianSharpend": _KEYS | {"sigma1_x", "sigma1_y", "sigma1_z", "sigma2_x", "sigma2_y", "sigma2_z", "alpha",
                                     "approx", "prob"},
    "RandHistogramShiftd": _KEYS | {"num_control_points", "prob"},
    "RandBiasFieldd": _KEYS | {"degree", "coeff_range", "dtype", "prob"},
    "RandCoarseDropoutd": _KEYS | {"holes", "spatial_size", "dropout_holes", "fill_value", "max_holes",
                                   "max_spatial_size", "prob"},
    "RandCoarseShuffled": _KEYS | {"holes", "spatial_size", "max_holes", "max_spatial_size", "prob"},
    "RandGibbsNoised": _KEYS | {"prob", "alpha"},
    "RandKSpaceSpikeNoised": _KEYS | {"prob", "intensity_range", "channel_wise"},
}

# Image readers LoadImaged may name: each decodes one image file (no pickles, no keyword arguments).
LOAD_READERS = ("PILReader", "ITKReader", "NibabelReader")
# The record items that may hold a file path: the image (classification and 3-D segmentation records) and, in
# 3-D segmentation records, its mask; LoadImaged reads nothing else, and always the image.
LOAD_KEY = "image"
LOAD_KEYS = (LOAD_KEY, "label")
_PLAIN = (str, int, float, bool, type(None))
EXPRESSION_MARKERS = ("$", "%")  # what MONAI's config parser evaluates ("$") or resolves as a macro ("%")


def _plain(value: Any) -> bool:
    """Plain YAML data: scalars, and lists and string-keyed mappings of plain data."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, list):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    return False


def _expression(value: Any) -> str | None:
    """The first string of plain data `value` (mapping keys included) that starts with an expression marker."""
    if isinstance(value, str):
        return value if value.startswith(EXPRESSION_MARKERS) else None
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else []
    return next((found for found in map(_expression, items) if found is not None), None)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def check_transform(name: str, arguments: Mapping[str, Any], where: str) -> None:
    """Refuse a recipe step that names a transform or an argument outside the allow-list, a LoadImaged that
    reads anything but the record's image with an image reader, or a value that is not plain data.
    `where` names the recipe file, the step and the transform."""
    allowed = ALLOWED_TRANSFORMS.get(name)
    if allowed is None:
        close = difflib.get_close_matches(name, list(ALLOWED_TRANSFORMS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: '{name}' is not a transform recipes may use: only MONAI transforms that "
                          f"neither read nor write files beyond their input are allowed{hint}")
    for argument, value in arguments.items():
        if argument not in allowed:
            raise ConfigError(f"{where}: argument '{argument}' is not allowed for {name} "
                              f"(allowed: {', '.join(sorted(allowed))})")
        if not _plain(value):
            raise ConfigError(f"{where}: argument '{argument}' must be plain data (text, numbers, lists), "
                              f"not {type(value).__name__}")
        expression = _expression(value)
        if expression is not None:
            shown = expression if len(expression) <= 60 else expression[:57] + "..."
            raise ConfigError(f"{where}: argument '{argument}': value '{shown}' starts with '{expression[0]}', which "
                              "MONAI would read as an expression; recipe values are plain data, never evaluated")
    if name == "LoadImaged":
        readers = [reader for reader in _as_list(arguments.get("reader")) if reader is not None]
        bad = [reader for reader in readers if reader not in LOAD_READERS]
        if bad:
            raise ConfigError(f"{where}: reader '{bad[0]}' is not allowed (use one of {', '.join(LOAD_READERS)})")
        keys = _as_list(arguments.get("keys"))
        if keys not in ([LOAD_KEY], list(LOAD_KEYS)):
            raise ConfigError(f"{where}: LoadImaged may only load the record's '{LOAD_KEY}' file (keys: [{LOAD_KEY}]), "
                              f"or its image and mask (keys: [{', '.join(LOAD_KEYS)}])")
