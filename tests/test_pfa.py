"""Tests of medfl.federated.pfa against hand-computed cases, a plain numpy PFA and the reference vectors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from medfl.federated.params import Role, parameter_roles
from medfl.federated.pfa import pfa_aggregate, pfa_ratio
from medfl.models import build_model

REFERENCE_VECTORS = Path(__file__).resolve().parent / "data" / "pfa_reference_vectors.npz"
SPECTRAL_ROLES = (Role.CONV, Role.CONV_TRANSPOSE, Role.LINEAR, Role.CLASSIFIER)


# ---- a plain numpy PFA: float64, one site and one tensor at a time, steps 1-5 as written ----------------


def _canonical(spectrum: np.ndarray) -> np.ndarray:
    """Imaginary part +0 on the DC / Nyquist bins (real for real input), so their angle is 0 or +pi."""
    spectrum = spectrum.copy()
    real_axes = [[0] + ([n // 2] if n % 2 == 0 else []) for n in spectrum.shape]
    for index in itertools.product(*real_axes):
        spectrum[index] = spectrum[index].real
    return spectrum


def numpy_pfa_signals(
    signals: list[np.ndarray], ratio: float, weights: list[float], share_phase: bool
) -> list[np.ndarray]:
    """PFA of one matrix (or one row) per site."""
    amplitudes, phases = [], []
    for signal in signals:
        spectrum = _canonical(np.fft.fftn(signal.astype(np.float64)))
        amplitudes.append(np.fft.fftshift(np.abs(spectrum)))
        phases.append(np.fft.fftshift(np.angle(spectrum)))
    shared_amplitude = sum(w * a for w, a in zip(weights, amplitudes, strict=True))
    shared_phase = sum(w * p for w, p in zip(weights, phases, strict=True))
    box = tuple(
        slice(n // 2 - int(np.floor(n * ratio / 2)), n // 2 + int(np.floor(n * ratio / 2)))
        for n in signals[0].shape
    )
    outputs = []
    for amplitude, phase in zip(amplitudes, phases, strict=True):
        amplitude, phase = amplitude.copy(), phase.copy()
        amplitude[box] = shared_amplitude[box]
        if share_phase:
            phase[box] = shared_phase[box]
        rebuilt = np.fft.ifftshift(amplitude) * np.exp(1j * np.fft.ifftshift(phase))
        outputs.append(np.real(np.fft.ifftn(rebuilt)))
    return outputs


def numpy_pfa_entry(
    arrays: list[np.ndarray], role: Role, ratio: float, weights: list[float], share_phase: bool
) -> list[np.ndarray]:
    """PFA of one state-dict entry given per site, routed by role."""
    shape = arrays[0].shape
    if role is Role.CLASSIFIER:
        rows = [a.reshape(shape[0], -1) for a in arrays]
        mixed = [np.empty(r.shape) for r in rows]
        for c in range(shape[0]):
            for site, row in enumerate(numpy_pfa_signals([r[c] for r in rows], ratio, weights, share_phase)):
                mixed[site][c] = row
        return [m.reshape(shape) for m in mixed]
    if role is Role.LINEAR:
        return numpy_pfa_signals(arrays, ratio, weights, share_phase)
    if role is Role.CONV_TRANSPOSE:
        arrays = [np.swapaxes(a, 0, 1) for a in arrays]
    n_out, c_in, k1 = arrays[0].shape[:3]
    matrices = [np.moveaxis(a, 0, -1).reshape(c_in * k1, -1) for a in arrays]
    mixed = numpy_pfa_signals(matrices, ratio, weights, share_phase)
    kernels = [np.moveaxis(m.reshape(*arrays[0].shape[1:], n_out), -1, 0) for m in mixed]
    return [np.swapaxes(k, 0, 1) for k in kernels] if role is Role.CONV_TRANSPOSE else kernels


def numpy_pfa_states(
    states: dict[str, dict[str, torch.Tensor]],
    roles: dict[str, Role],
    ratio: float,
    counts: dict[str, float] | None,
    share_phase: bool,
) -> dict[str, dict[str, np.ndarray]]:
    sites = list(states)
    raw = [1.0] * len(sites) if counts is None else [float(counts[s]) for s in sites]
    weights = [w / sum(raw) for w in raw]
    out: dict[str, dict[str, np.ndarray]] = {site: {} for site in sites}
    for key, role in roles.items():
        arrays = [states[site][key].detach().cpu().double().numpy() for site in sites]
        if role is Role.NORM:
            mixed = arrays
        elif role is Role.OTHER:
            mixed = [sum(w * a for w, a in zip(weights, arrays, strict=True))] * len(sites)
        else:
            mixed = numpy_pfa_entry(arrays, role, ratio, weights, share_phase)
        for site, array in zip(sites, mixed, strict=True):
            out[site][key] = array
    return out


def max_difference(
    result: dict[str, dict[str, torch.Tensor]], expected: dict[str, dict[str, np.ndarray]]
) -> float:
    return max(
        float(np.abs(result[site][key].double().numpy() - expected[site][key]).max(initial=0.0))
        for site in expected
        for key in expected[site]
    )


# ---- fixtures -------------------------------------------------------------------------------------------

ENTRY_SHAPES: dict[str, tuple[Role, tuple[int, ...]]] = {
    "conv2d": (Role.CONV, (8, 4, 3, 3)),
    "conv1x1": (Role.CONV, (6, 5, 1, 1)),
    "depthwise": (Role.CONV, (6, 1, 3, 3)),
    "conv3d": (Role.CONV, (4, 3, 3, 3, 3)),
    "conv1d": (Role.CONV, (5, 3, 3)),
    "up": (Role.CONV_TRANSPOSE, (6, 4, 2, 2)),
    "up3": (Role.CONV_TRANSPOSE, (4, 6, 3, 3)),
    "fc": (Role.LINEAR, (6, 10)),
    "fc_same_shape": (Role.LINEAR, (6, 10)),
    "head": (Role.CLASSIFIER, (3, 10)),
    "conv_head": (Role.CLASSIFIER, (2, 10, 1, 1)),
    "bias": (Role.OTHER, (8,)),
    "bn.weight": (Role.NORM, (8,)),
    "bn.num_batches_tracked": (Role.NORM, ()),
}
ROLES = {key: role for key, (role, _) in ENTRY_SHAPES.items()}


def random_states(
    sites: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    states = {}
    for index in range(sites):
        state = {}
        for key, (_, shape) in ENTRY_SHAPES.items():
            if key.endswith("num_batches_tracked"):
                state[key] = torch.tensor(index + 1)
            else:
                state[key] = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        states[f"site{index}"] = state
    return states


# ---- behaviour ------------------------------------------------------------------------------------------


def test_hand_computed_rows_share_dc_and_keep_nyquist() -> None:
    # Rows of length 4 at L = 0.5: b = 1, centre 2, shifted bins [1, 3) = frequencies -1 and 0 (DC).
    # Site a = 2 + alternating(+1,-1): DC 8, Nyquist 4. Site b = 3: DC 12. Shared DC amplitude 10 -> 2.5;
    # the Nyquist bin lies outside the box, so a keeps its alternating part and b gets none.
    states = {
        "a": {"head": torch.tensor([[3.0, 1.0, 3.0, 1.0]], dtype=torch.float64)},
        "b": {"head": torch.tensor([[3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)},
    }
    out = pfa_aggregate(states, {"head": Role.CLASSIFIER}, 0.5)
    assert torch.allclose(out["a"]["head"], torch.tensor([[3.5, 1.5, 3.5, 1.5]], dtype=torch.float64))
    assert torch.allclose(out["b"]["head"], torch.full((1, 4), 2.5, dtype=torch.float64))


def test_hand_computed_phase_is_a_linear_mean_of_angles() -> None:
    # DC -4 (angle pi) and DC +4 (angle 0): mean amplitude 4, mean phase pi/2 -> real part 0, not the value mean.
    states = {
        "a": {"head": torch.full((1, 4), -1.0, dtype=torch.float64)},
        "b": {"head": torch.full((1, 4), 1.0, dtype=torch.float64)},
    }
    shared = pfa_aggregate(states, {"head": Role.CLASSIFIER}, 0.5)
    assert torch.allclose(shared["a"]["head"], torch.zeros(1, 4, dtype=torch.float64), atol=1e-12)
    amplitude_only = pfa_aggregate(states, {"head": Role.CLASSIFIER}, 0.5, share_phase=False)
    assert torch.allclose(amplitude_only["a"]["head"], states["a"]["head"])
    assert torch.allclose(amplitude_only["b"]["head"], states["b"]["head"])


def test_classifier_classes_never_mix() -> None:
    states = random_states(3)
    changed = {site: dict(state) for site, state in states.items()}
    changed["site1"]["head"] = states["site1"]["head"].clone()
    changed["site1"]["head"][1] += 5.0
    before = pfa_aggregate(states, ROLES, 0.9)
    after = pfa_aggregate(changed, ROLES, 0.9)
    for site in states:
        for row in (0, 2):
            assert torch.allclose(before[site]["head"][row], after[site]["head"][row], atol=1e-7)
        assert not torch.allclose(before[site]["head"][1], after[site]["head"][1])


def test_identity_when_all_sites_agree() -> None:
    one = random_states(1)["site0"]
    states = {name: {k: v.clone() for k, v in one.items()} for name in ("a", "b", "c")}
    out = pfa_aggregate(states, ROLES, 0.95)
    for site in states:
        for key in ROLES:
            assert torch.allclose(out[site][key], one[key], atol=1e-6), key


def test_ratio_zero_returns_own_tensors_and_still_averages_other_entries() -> None:
    states = random_states(3)
    out = pfa_aggregate(states, ROLES, 0.0)
    mean_bias = sum(states[s]["bias"] for s in states) / 3
    for site in states:
        for key, role in ROLES.items():
            expected = mean_bias if role is Role.OTHER else states[site][key]
            assert torch.allclose(out[site][key], expected, atol=1e-6), key


def test_site_order_does_not_matter() -> None:
    states = random_states(4)
    counts = {"site0": 10, "site1": 200, "site2": 30, "site3": 45}
    forward = pfa_aggregate(states, ROLES, 0.7, counts)
    reordered = {name: states[name] for name in ("site2", "site0", "site3", "site1")}
    backward = pfa_aggregate(reordered, ROLES, 0.7, counts)
    assert list(backward) == list(reordered)
    for site in states:
        for key in ROLES:
            assert torch.allclose(forward[site][key], backward[site][key], atol=1e-6), key


def test_norm_entries_are_the_sites_own_objects() -> None:
    states = random_states(3)
    out = pfa_aggregate(states, ROLES, 0.9)
    for site in states:
        for key in ("bn.weight", "bn.num_batches_tracked"):
            assert out[site][key] is states[site][key]


def test_other_entries_get_the_sample_weighted_average() -> None:
    states = random_states(2)
    states["site0"]["bias"] = torch.full((8,), 1.0)
    states["site1"]["bias"] = torch.full((8,), 5.0)
    out = pfa_aggregate(states, ROLES, 0.7, {"site0": 3, "site1": 1})
    for site in states:
        assert torch.allclose(out[site]["bias"], torch.full((8,), 2.0))
    assert out["site0"]["bias"].data_ptr() != out["site1"]["bias"].data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_output_shares_memory_with_another_site_or_the_input(dtype: torch.dtype) -> None:
    # A view into a stack of all sites would be saved, with the other sites' weights, by torch.save.
    states = random_states(3, dtype=dtype)
    out = pfa_aggregate(states, ROLES, 0.8)
    storages = [
        (site, key, out[site][key].untyped_storage().data_ptr())
        for site in out
        for key, role in ROLES.items()
        if role is not Role.NORM
    ]
    assert len({pointer for _, _, pointer in storages}) == len(storages)
    inputs = {t.untyped_storage().data_ptr() for state in states.values() for t in state.values()}
    assert not inputs & {pointer for _, _, pointer in storages}
    for site, key, _ in storages:
        assert out[site][key].untyped_storage().nbytes() == out[site][key].nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_devices_and_key_order_are_kept(dtype: torch.dtype) -> None:
    states = random_states(3, dtype=dtype)
    out = pfa_aggregate(states, ROLES, 0.8)
    for site in states:
        assert list(out[site]) == list(states[site])
        for key, tensor in states[site].items():
            assert out[site][key].shape == tensor.shape
            assert out[site][key].dtype == tensor.dtype
            assert out[site][key].device == tensor.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_stay_on_cuda_and_match_cpu() -> None:
    states = random_states(3)
    on_gpu = {s: {k: v.cuda() for k, v in state.items()} for s, state in states.items()}
    gpu = pfa_aggregate(on_gpu, ROLES, 0.8)
    cpu = pfa_aggregate(states, ROLES, 0.8)
    for site in states:
        for key in ROLES:
            assert gpu[site][key].is_cuda
            assert torch.allclose(gpu[site][key].cpu(), cpu[site][key], atol=1e-5)


@pytest.mark.parametrize("sites", range(1, 9))
@pytest.mark.parametrize("share_phase", [True, False])
def test_equals_numpy_pfa_for_every_role(sites: int, share_phase: bool) -> None:
    states = random_states(sites, seed=sites)
    counts = {site: 10.0 * (i + 1) ** 2 for i, site in enumerate(states)} if sites % 2 else None
    ratio = (0.5, 0.7, 0.95, 1.0, 0.3)[sites % 5]
    out = pfa_aggregate(states, ROLES, ratio, counts, share_phase)
    assert max_difference(out, numpy_pfa_states(states, ROLES, ratio, counts, share_phase)) <= 1e-5


@pytest.mark.parametrize("shape", [(12, 24), (96, 192), (8, 10)])
def test_real_bins_with_negative_values_match_numpy(shape: tuple[int, int]) -> None:
    # The DC and Nyquist bins are real; when negative, numpy and torch (MKL, cuFFT) disagree on the sign of
    # their zero imaginary part, i.e. angle +pi or -pi, unless both canonicalise. At L = 1 the Nyquist bins
    # lie in the box, and a flipped sign would move the shared phase there by 2pi/K.
    generator = torch.Generator().manual_seed(3)
    states = {
        f"s{k}": {"w": torch.randn(shape, generator=generator, dtype=torch.float64) - 3} for k in range(4)
    }
    roles = {"w": Role.LINEAR}
    out = pfa_aggregate(states, roles, 1.0)
    assert max_difference(out, numpy_pfa_states(states, roles, 1.0, None, True)) <= 1e-9


def test_reproduces_reference_vectors() -> None:
    vectors = np.load(REFERENCE_VECTORS)
    roles = {"conv": Role.CONV, "linear": Role.LINEAR, "classifier": Role.CLASSIFIER}
    states = {
        f"site{k}": {name: torch.from_numpy(vectors[f"{name}_in"][k]) for name in roles} for k in range(4)
    }
    for suffix in ("L050", "L070", "L095"):
        ratio = int(suffix[1:]) / 100
        for share_phase, mode in ((True, "phase"), (False, "amplitude")):
            out = pfa_aggregate(states, roles, ratio, share_phase=share_phase)
            expected = {"conv": f"conv_{mode}_{suffix}", "linear": f"linear_{mode}_{suffix}"}
            if share_phase:
                expected["classifier"] = f"classifier_rows_{suffix}"
            for name, array_name in expected.items():
                for k in range(4):
                    result = out[f"site{k}"][name]
                    assert result.dtype == torch.float32
                    assert np.abs(result.numpy() - vectors[array_name][k]).max() <= 1e-5, (array_name, k)


NETWORKS = [
    ("slim_vgg16", "classification", {"width": 0.125}),
    ("resnet18", "classification", {"width": 0.125}),
    ("densenet121", "classification", {"width": 0.125}),
    ("efficientnet-b0", "classification", {"width": 0.25}),
    ("unet", "segmentation", {"width": 0.25}),
    ("basicunet", "segmentation", {"width": 0.25}),
]


@pytest.mark.parametrize(("name", "task", "options"), NETWORKS, ids=[n[0] for n in NETWORKS])
def test_whole_network_equals_numpy_pfa(name: str, task: str, options: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, task, num_classes=3, in_channels=1, **options)
    roles = parameter_roles(model)
    assert set(roles.values()) & set(SPECTRAL_ROLES), "the network should have FFT-routed entries"
    assert Role.CLASSIFIER in roles.values()
    base = model.state_dict()
    generator = torch.Generator().manual_seed(1)
    states = {}
    for site in ("a", "b", "c"):
        states[site] = {
            key: tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
            if tensor.is_floating_point()
            else tensor
            for key, tensor in base.items()
        }
    counts = {"a": 120, "b": 40, "c": 75}
    out = pfa_aggregate(states, roles, 0.8, counts)
    assert max_difference(out, numpy_pfa_states(states, roles, 0.8, counts, True)) <= 1e-5
    for site in states:
        for key, role in roles.items():
            if role is Role.NORM:
                assert out[site][key] is states[site][key]


# ---- validation and the schedule ------------------------------------------------------------------------


def test_missing_role_names_the_entry() -> None:
    states = random_states(2)
    roles = {k: r for k, r in ROLES.items() if k != "fc"}
    with pytest.raises(ValueError, match="'fc'"):
        pfa_aggregate(states, roles, 0.5)


def test_sites_with_different_entries_or_shapes_are_rejected() -> None:
    states = random_states(2)
    del states["site1"]["bias"]
    with pytest.raises(ValueError, match="site 'site1'.*'bias'"):
        pfa_aggregate(states, ROLES, 0.5)
    states = random_states(2)
    states["site1"]["fc"] = torch.zeros(6, 11)
    with pytest.raises(ValueError, match="site 'site1'.*'fc'"):
        pfa_aggregate(states, ROLES, 0.5)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_outside_unit_interval_is_rejected(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        pfa_aggregate(random_states(2), ROLES, ratio)


def test_linear_role_on_a_kernel_is_rejected() -> None:
    states = random_states(2)
    with pytest.raises(ValueError, match="'conv2d'"):
        pfa_aggregate(states, {**ROLES, "conv2d": Role.LINEAR}, 0.5)


def test_pfa_ratio_schedule() -> None:
    assert pfa_ratio(0, 1, 0.7, 0.95) == pytest.approx(0.7)
    assert pfa_ratio(0, 50, 0.7, 0.95) == pytest.approx(0.7)
    assert pfa_ratio(25, 50, 0.7, 0.95) == pytest.approx(0.825)
    assert pfa_ratio(49, 50, 0.7, 0.95) == pytest.approx(0.7 + 49 / 50 * 0.25)
    assert pfa_ratio(3, 4, start=0.2, end=0.6) == pytest.approx(0.5)


@pytest.mark.parametrize(("round_", "rounds"), [(-1, 5), (5, 5), (0, 0)])
def test_pfa_ratio_rejects_rounds_out_of_range(round_: int, rounds: int) -> None:
    with pytest.raises(ValueError):
        pfa_ratio(round_, rounds, 0.7, 0.95)


# ---- 3-D kernels (volumetric segmentation) ---------------------------------------------------------------


def _rule_matrix(kernel: np.ndarray) -> np.ndarray:
    """algorithm.md's rule for an n-D kernel (N_out, C_in, k1, ..., kn): permute to (C_in, k1, ..., kn, N_out),
    flatten to (C_in*k1) x (k2*...*kn*N_out)."""
    n_out, c_in, k1 = kernel.shape[:3]
    return np.transpose(kernel, (1, *range(2, kernel.ndim), 0)).reshape(c_in * k1, -1)


def _rule_kernel(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The rule's reshape inverted exactly."""
    permuted = matrix.reshape(*shape[1:], shape[0])
    return np.transpose(permuted, (permuted.ndim - 1, *range(permuted.ndim - 1)))


@pytest.mark.parametrize("role", [Role.CONV, Role.CONV_TRANSPOSE])
def test_hand_made_3d_kernel_follows_the_spectral_rule(role: Role) -> None:
    # Conv3d (N_out 2, C_in 2, 2 x 1 x 2) -> a 4 x 4 matrix, so that L = 0.5 gives a 2 x 2 box around DC;
    # ConvTranspose3d stores (C_in, N_out, k...): first two axes swapped, then the same rule.
    shape = (2, 2, 2, 1, 2)
    generator = np.random.default_rng(0)
    kernels = {site: generator.normal(size=shape) for site in ("a", "b")}
    stored = {site: np.swapaxes(k, 0, 1) if role is Role.CONV_TRANSPOSE else k for site, k in kernels.items()}
    out = pfa_aggregate({site: {"w": torch.from_numpy(k)} for site, k in stored.items()}, {"w": role}, 0.5)
    matrices = numpy_pfa_signals([_rule_matrix(kernels[s]) for s in ("a", "b")], 0.5, [0.5, 0.5], True)
    for site, matrix in zip(("a", "b"), matrices, strict=True):
        expected = _rule_kernel(matrix, shape)
        if role is Role.CONV_TRANSPOSE:
            expected = np.swapaxes(expected, 0, 1)
        np.testing.assert_allclose(out[site]["w"].numpy(), expected, atol=1e-12)
    # hand values: constant kernels have only a DC bin, inside the box: both sites get the mean
    constant = {"a": {"w": torch.full(shape, 1.0, dtype=torch.float64)},
                "b": {"w": torch.full(shape, 3.0, dtype=torch.float64)}}
    shared = pfa_aggregate(constant, {"w": role}, 0.5)
    assert all(torch.allclose(shared[site]["w"], torch.full(shape, 2.0, dtype=torch.float64)) for site in "ab")


def test_whole_3d_unet_equals_numpy_pfa() -> None:
    torch.manual_seed(0)
    model = build_model("unet", "segmentation", num_classes=2, in_channels=1, width=0.125, spatial_dims=3,
                        channels=[16, 32, 64], strides=[2, 2], num_res_units=1)
    roles = parameter_roles(model)
    kinds = {type(module) for module in model.modules()}
    assert {torch.nn.Conv3d, torch.nn.ConvTranspose3d} <= kinds
    assert {Role.CONV, Role.CONV_TRANSPOSE, Role.CLASSIFIER} <= set(roles.values())
    assert roles["final_classifier.weight"] is Role.CLASSIFIER
    generator = torch.Generator().manual_seed(1)
    states = {site: {key: tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
                     if tensor.is_floating_point() else tensor for key, tensor in model.state_dict().items()}
              for site in ("a", "b")}
    out = pfa_aggregate(states, roles, 0.8)
    assert max_difference(out, numpy_pfa_states(states, roles, 0.8, None, True)) <= 1e-5
