"""medfl.deliver.programs: the volume pipeline that `medfl predict` and the MONAI bundle run reproduces the data
layer's slices bit for bit (percentile clip, z-score, anti-aliased resize, context slices), its logits are the
network's on those slices in batches of 32, resized back, as predict computed them before, and TorchScript
keeps every number."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medfl.data.prostate import slice_record
from medfl.data.volumes import PreparedCase, preprocess_volume, resize_slices
from medfl.deliver.programs import LogitsOnly, SliceWiseProgram, normalise_volume


def _volumes() -> list[np.ndarray]:
    """Integer-valued (as MRI usually is) and continuous volumes, small and above MONAI's 1M-voxel switch from
    torch.quantile to NumPy."""
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 2000, (9, 30, 26)).astype(np.float32),
        rng.normal(300.0, 80.0, (5, 17, 40)).astype(np.float32),
        (rng.gamma(2.0, 150.0, (7, 23, 23)) + rng.normal(0, 1, (7, 23, 23))).astype(np.float32),
        rng.integers(0, 4096, (6, 420, 410)).astype(np.float32),
        rng.normal(500.0, 120.0, (6, 410, 420)).astype(np.float32),
    ]


@pytest.mark.parametrize("index", range(5))
def test_intensity_steps_give_the_data_layers_slices(index):
    volume = _volumes()[index]
    normalised = normalise_volume(torch.from_numpy(volume))
    assert normalised.shape == (1, 1, *volume.shape) and normalised.dtype == torch.float32
    got = resize_slices(normalised[0, 0].numpy(), 24, 24, "bilinear")
    np.testing.assert_array_equal(got, preprocess_volume(volume, 24))


class Recorder(nn.Module):
    """A 1x1 convolution to 2 classes that keeps every batch it was given."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2, 1)
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches.append(x.clone())
        return self.conv(x), x


@pytest.mark.parametrize(("depth", "context"), [(5, 1), (40, 2), (3, 0)])
def test_slicewise_program_sees_the_data_layers_slices_and_returns_its_logits(depth, context):
    volume = np.random.default_rng(depth).normal(200.0, 40.0, (depth, 21, 27)).astype(np.float32)
    size = 16
    network = Recorder(2 * context + 1).eval()
    program = SliceWiseProgram(LogitsOnly(network), size, context).eval()
    with torch.no_grad():
        logits = program(normalise_volume(torch.from_numpy(volume)))
    slices = preprocess_volume(volume, size)
    case = PreparedCase("case", slices, np.zeros(slices.shape, np.uint8), None)
    records = np.stack([slice_record(case, i, context, "site")["image"] for i in range(depth)])
    seen = torch.cat(network.batches)
    assert len(network.batches) == -(-depth // 32)
    np.testing.assert_array_equal(seen.numpy(), records)
    with torch.no_grad():  # as predict did before the program: batches of 32 slices of one volume
        expected = torch.cat([F.interpolate(network.conv(torch.from_numpy(records[start:start + 32])), size=(21, 27),
                                            mode="bilinear", align_corners=False) for start in range(0, depth, 32)])
    assert logits.shape == (1, 2, depth, 21, 27)
    torch.testing.assert_close(logits[0].transpose(0, 1), expected, rtol=0, atol=0)


def test_the_program_scripts_and_keeps_its_numbers():
    network = Recorder(3).eval()
    eager = SliceWiseProgram(LogitsOnly(network), 16, 1).eval()
    traced = torch.jit.trace(LogitsOnly(network).eval(), torch.rand(2, 3, 16, 16), check_trace=False)
    scripted = torch.jit.script(SliceWiseProgram(traced, 16, 1))
    volume = torch.randn(1, 1, 35, 19, 22)
    with torch.no_grad():
        assert torch.equal(scripted(volume), eager(volume))
