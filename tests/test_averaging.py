"""Tests of medfl.federated.averaging: site weights, tensor and state-dict averages."""

from __future__ import annotations

import pytest
import torch

from medfl.federated.averaging import average_states, normalise_site_weights, weighted_average


def test_uniform_weights_when_none() -> None:
    weights = normalise_site_weights(["a", "b", "c", "d"], None)
    assert weights.dtype == torch.float64
    assert torch.equal(weights, torch.full((4,), 0.25, dtype=torch.float64))


def test_sample_count_weights_are_normalised_in_site_order() -> None:
    weights = normalise_site_weights(["b", "a"], {"a": 30, "b": 10})
    assert torch.allclose(weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert weights.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("site_weights", "message"),
    [
        ({"a": 1.0}, "site 'b'"),
        ({"a": 1.0, "b": -2.0}, "site 'b'"),
        ({"a": 1.0, "b": float("nan")}, "site 'b'"),
        ({"a": 0.0, "b": 0.0}, "sum to zero"),
    ],
)
def test_bad_site_weights_name_the_problem(site_weights: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalise_site_weights(["a", "b"], site_weights)


def test_no_sites_is_an_error() -> None:
    with pytest.raises(ValueError):
        normalise_site_weights([], None)


def test_weighted_average_hand_computed_keeps_dtype() -> None:
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    result = weighted_average(tensors, weights)
    assert result.dtype == torch.float32
    assert torch.equal(result, torch.tensor([2.5, 5.0]))


def test_weighted_average_accumulates_in_float64() -> None:
    # In float32, (2**24)/3 + 1/3 - (2**24)/3 loses the 1/3; the float64 accumulation keeps it.
    tensors = [torch.tensor([2.0**24]), torch.tensor([1.0]), torch.tensor([-(2.0**24)])]
    result = weighted_average(tensors, normalise_site_weights(["a", "b", "c"], None))
    assert result.dtype == torch.float32
    assert result.item() == pytest.approx(1.0 / 3.0, rel=1e-6)


def test_weighted_average_of_integers_returns_first_unchanged() -> None:
    first = torch.tensor(7)
    result = weighted_average([first, torch.tensor(100)], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert result.item() == 7
    assert result.dtype == torch.int64
    assert result.data_ptr() != first.data_ptr()


def test_weighted_average_rejects_wrong_weight_count() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        weighted_average([torch.zeros(2), torch.ones(2)], torch.ones(3, dtype=torch.float64) / 3)


def test_average_states_selected_keys_only() -> None:
    states = {
        "a": {"w": torch.ones(2, 3), "b": torch.zeros(3), "n": torch.tensor(4)},
        "b": {"w": 3 * torch.ones(2, 3), "b": torch.ones(3), "n": torch.tensor(9)},
    }
    weights = normalise_site_weights(list(states), {"a": 1, "b": 3})
    result = average_states(states, weights, ["w", "n"])
    assert set(result) == {"w", "n"}
    assert torch.allclose(result["w"], torch.full((2, 3), 2.5))
    assert result["n"].item() == 4


def test_average_states_does_not_depend_on_site_order() -> None:
    generator = torch.Generator().manual_seed(0)
    states = {name: {"w": torch.randn(4, 5, generator=generator)} for name in "abcd"}
    counts = {"a": 1, "b": 2, "c": 3, "d": 4}
    forward = average_states(states, normalise_site_weights(list(states), counts), ["w"])
    reordered = {name: states[name] for name in "dbca"}
    backward = average_states(reordered, normalise_site_weights(list(reordered), counts), ["w"])
    assert torch.allclose(forward["w"], backward["w"], atol=1e-7)


def test_average_states_missing_key_names_site_and_key() -> None:
    states = {"a": {"w": torch.ones(2)}, "b": {}}
    with pytest.raises(ValueError, match="site 'b'.*'w'"):
        average_states(states, normalise_site_weights(list(states), None), ["w"])


def test_average_states_shape_mismatch_names_key() -> None:
    states = {"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(3)}}
    with pytest.raises(ValueError, match="entry 'w'"):
        average_states(states, normalise_site_weights(list(states), None), ["w"])
