"""The network programs that exports carry and `medfl predict` runs: logits alone, and an MRI volume through a
2.5-D slice model as one program (what `medfl predict` and the MONAI bundle both run, so that their masks are
the same voxel for voxel).

The data layer (medfl.data.volumes, medfl.data.prostate) trains and scores on slices made in three steps:
a volume in the working orientation is clipped to its 0.5-99.5 intensity percentiles and z-scored, every
axial slice is resized to input_size x input_size (torch's anti-aliased bilinear), and each slice gets its
`context_slices` neighbours on either side as channels (edge slices repeated). Predicted slice logits are
resized back (bilinear) to the slice's own size.

The first step has stock MONAI transforms (`INTENSITY_STEPS`, the exact list the bundle's config names,
applied to a (1, Z, Y, X) volume). The other two have none (MONAI's Resize anti-aliases with a Gaussian
filter, not as torch does, and MONAI has no 2.5-D slice inferer), so `SliceWiseProgram` does them around
the network: (1, 1, Z, Y, X) preprocessed volume -> (1, classes, Z, Y, X) logits. It is TorchScript-ready.

The intensity steps reproduce the data layer's numbers only in this layout: the z-score sums voxels in
memory order, which must be the data layer's (Z, Y, X) order, and the percentiles are taken in float64 as
NumPy takes them (tests/test_programs.py checks both).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfl.data.volumes import INTENSITY_PERCENTILES

# (MONAI array transform, arguments): the volume's intensity preprocessing; the bundle names the "d" versions.
INTENSITY_STEPS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("CastToType", {"dtype": "float64"}),
    ("ClipIntensityPercentiles", {"lower": INTENSITY_PERCENTILES[0], "upper": INTENSITY_PERCENTILES[1]}),
    ("NormalizeIntensity", {"dtype": "float32"}),
)
SLICE_BATCH = 32  # slices per network call: bounds memory on large volumes


class LogitsOnly(nn.Module):
    """A medfl network whose forward returns the logits alone (medfl networks return (logits, features))."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[0]


def intensity_transform():
    """INTENSITY_STEPS as one MONAI Compose of array transforms, for a (1, Z, Y, X) volume."""
    import monai.transforms

    return monai.transforms.Compose([getattr(monai.transforms, name)(**args) for name, args in INTENSITY_STEPS])


def normalise_volume(volume: torch.Tensor) -> torch.Tensor:
    """A (Z, Y, X) volume in working orientation -> the (1, 1, Z, Y, X) float32 input of SliceWiseProgram."""
    normalised = intensity_transform()(volume.contiguous()[None])
    return torch.as_tensor(normalised).as_subclass(torch.Tensor).float()[None]


class SliceWiseProgram(nn.Module):
    """Slice-wise 2.5-D inference on a whole preprocessed volume: resize each axial slice to the network's input
    size, stack each slice with its context neighbours, run the network in batches of SLICE_BATCH slices and
    resize the logits back to the slice size. `network` maps (B, 2k+1, S, S) to logits (B, classes, S, S)."""

    def __init__(self, network: nn.Module, input_size: int, context_slices: int):
        super().__init__()
        self.network = network
        self.input_size = int(input_size)
        self.context_slices = int(context_slices)
        self.slice_batch = SLICE_BATCH

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        slices = volume[0].transpose(0, 1)  # (1, Z, Y, X) -> (Z, 1, Y, X)
        depth, height, width = slices.shape[0], slices.shape[2], slices.shape[3]
        small = F.interpolate(slices, size=[self.input_size, self.input_size], mode="bilinear",
                              align_corners=False, antialias=True)[:, 0]
        offsets = torch.arange(-self.context_slices, self.context_slices + 1, device=volume.device)
        neighbours = (torch.arange(depth, device=volume.device)[:, None] + offsets[None, :]).clamp(0, depth - 1)
        outputs: list[torch.Tensor] = []
        for start in range(0, depth, self.slice_batch):
            logits = self.network(small[neighbours[start:start + self.slice_batch]])
            outputs.append(F.interpolate(logits, size=[height, width], mode="bilinear", align_corners=False))
        return torch.cat(outputs).transpose(0, 1)[None]
