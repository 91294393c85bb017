"""Server strategies: FedAvg and its key-filtered variants, PFA, prototypes, counts, resume, factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfl.errors import ConfigError
from medfl.federated.params import parameter_roles
from medfl.federated.pfa import pfa_aggregate, pfa_ratio
from medfl.federated.server import (
    FedAvg,
    FedBN,
    FedPer,
    PFAStrategy,
    PrototypeOnly,
    SiloBN,
    SiteUpdate,
    build_strategy,
)


class Tiny(nn.Module):
    """conv -> BN -> fc -> BN -> final classifier: every role the strategies route."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.fc_norm = nn.BatchNorm1d(6)
        self.final_classifier = nn.Linear(6, 3)


def _site_states(count: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    """Site states with distinct values, BN statistics included (counters as well)."""
    states = {}
    for index in range(count):
        torch.manual_seed(index)
        model = Tiny()
        state = {key: value.clone() for key, value in model.state_dict().items()}
        for key, value in state.items():
            if value.is_floating_point():
                state[key] = value + torch.randn_like(value)
            else:
                state[key] = value + index + 1
        states[f"site{index}"] = state
    return states


def _updates(samples: tuple[int, ...] = (10, 30, 60)) -> dict[str, SiteUpdate]:
    return {
        site: SiteUpdate(weights=state, num_samples=n)
        for (site, state), n in zip(_site_states(len(samples)).items(), samples, strict=True)
    }


def test_fedavg_sample_weighted_hand_values() -> None:
    updates = {
        "a": SiteUpdate({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(4.0)}, num_samples=1),
        "b": SiteUpdate({"w": torch.tensor([5.0, -2.0]), "b": torch.tensor(0.0)}, num_samples=3),
    }
    result = FedAvg().aggregate(0, updates)
    for site in ("a", "b"):
        torch.testing.assert_close(result.weights[site]["w"], torch.tensor([4.0, -1.0]))
        torch.testing.assert_close(result.weights[site]["b"], torch.tensor(1.0))
    assert result.weights["a"]["w"] is not result.weights["b"]["w"]
    uniform = FedAvg(weighting="uniform").aggregate(0, updates)
    torch.testing.assert_close(uniform.weights["a"]["w"], torch.tensor([3.0, 0.0]))
    assert result.global_class_counts is None and result.global_prototypes is None


def test_fedavg_averages_every_float_entry() -> None:
    updates = _updates()
    result = FedAvg().aggregate(0, updates)
    weights = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    for key in ("conv.weight", "norm.weight", "norm.running_var", "final_classifier.bias"):
        expected = sum(w * u.weights[key].double() for w, u in zip(weights, updates.values(), strict=True))
        for site in updates:
            torch.testing.assert_close(result.weights[site][key], expected.float())


def _check_local(result_weights: dict, updates: dict, local: set[str]) -> None:
    reference_site = next(iter(updates))
    for site, update in updates.items():
        assert result_weights[site].keys() == update.weights.keys()
        for key, value in result_weights[site].items():
            if key in local:
                assert torch.equal(value, update.weights[key])
            elif value.is_floating_point():
                torch.testing.assert_close(value, result_weights[reference_site][key])
                assert not torch.equal(value, update.weights[key])


def test_fedbn_keeps_each_sites_norm_entries() -> None:
    updates = _updates()
    strategy = FedBN.for_model(Tiny())
    local = {key for key in updates["site0"].weights if key.startswith(("norm.", "fc_norm."))}
    assert strategy.local_keys == local
    _check_local(strategy.aggregate(0, updates).weights, updates, local)


def test_silobn_keeps_only_statistics() -> None:
    updates = _updates()
    strategy = SiloBN.for_model(Tiny())
    local = {
        f"{module}.{name}"
        for module in ("norm", "fc_norm")
        for name in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert strategy.local_keys == local
    result = strategy.aggregate(0, updates).weights
    _check_local(result, updates, local)
    torch.testing.assert_close(result["site0"]["norm.weight"], result["site2"]["norm.weight"])


def test_fedper_keeps_the_classifier() -> None:
    updates = _updates()
    strategy = FedPer.for_model(Tiny())
    local = {"final_classifier.weight", "final_classifier.bias"}
    assert strategy.local_keys == local
    _check_local(strategy.aggregate(0, updates).weights, updates, local)


def test_key_mismatch_and_unknown_local_keys() -> None:
    updates = _updates()
    del updates["site1"].weights["conv.weight"]
    with pytest.raises(ValueError, match="site1"):
        FedAvg().aggregate(0, updates)
    with pytest.raises(ValueError, match="local keys"):
        FedBN({"nope.weight"}).aggregate(0, _updates())
    with pytest.raises(ValueError, match="local key"):
        FedBN(set())


def test_global_class_counts_are_sums() -> None:
    updates = _updates((5, 5))
    updates["site0"].class_counts = torch.tensor([3, 0, 2])
    updates["site1"].class_counts = torch.tensor([1, 4, 0])
    result = FedAvg().aggregate(0, updates)
    assert result.global_class_counts.tolist() == [4, 4, 2]
    updates["site1"].class_counts = None
    with pytest.raises(ValueError, match="site1"):
        FedAvg().aggregate(0, updates)


def test_global_prototypes_ignore_absent_classes() -> None:
    updates = {
        "a": SiteUpdate(
            {}, 4, prototypes=torch.tensor([[1.0, 1.0], [9.0, 9.0]]), prototype_counts=torch.tensor([1, 0])
        ),
        "b": SiteUpdate(
            {}, 4, prototypes=torch.tensor([[3.0, 5.0], [0.0, 0.0]]), prototype_counts=torch.tensor([3, 0])
        ),
        "c": SiteUpdate({}, 4),
    }
    result = PrototypeOnly().aggregate(0, updates)
    assert result.weights == {"a": {}, "b": {}, "c": {}}
    torch.testing.assert_close(result.global_prototypes, torch.tensor([[2.5, 4.0], [0.0, 0.0]]))
    assert result.global_prototype_present.tolist() == [True, False]
    updates["c"].prototypes = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="prototype_counts"):
        PrototypeOnly().aggregate(0, updates)


def _with_prototypes(updates: dict[str, SiteUpdate], round: int) -> dict[str, SiteUpdate]:
    for index, update in enumerate(updates.values()):
        generator = torch.Generator().manual_seed(100 * round + index)
        update.prototypes = torch.randn(3, 6, generator=generator)
        update.prototype_counts = torch.tensor([2, 0, 5])
    return updates


def test_state_dict_round_trip_gives_identical_next_aggregate() -> None:
    roles = parameter_roles(Tiny())
    first = PFAStrategy(roles, rounds=4, prototype_mode="gaussian", seed=11)
    first.aggregate(0, _with_prototypes(_updates(), 0))
    saved = first.state_dict()
    expected = first.aggregate(1, _with_prototypes(_updates(), 1))

    resumed = PFAStrategy(roles, rounds=4, prototype_mode="gaussian", seed=999)
    resumed.load_state_dict(saved)
    again = resumed.aggregate(1, _with_prototypes(_updates(), 1))
    assert torch.equal(again.global_prototypes, expected.global_prototypes)
    assert again.global_prototype_present.tolist() == [True, False, True]
    for site in expected.weights:
        for key, value in expected.weights[site].items():
            assert torch.equal(again.weights[site][key], value)

    fresh = PFAStrategy(roles, rounds=4, prototype_mode="gaussian", seed=999)
    other = fresh.aggregate(1, _with_prototypes(_updates(), 1))
    assert not torch.equal(other.global_prototypes, expected.global_prototypes)
    with pytest.raises(ValueError, match="FedAvg"):
        FedAvg().load_state_dict(saved)


@pytest.mark.parametrize(("weighting", "share_phase"), [("uniform", True), ("samples", False)])
def test_pfa_strategy_equals_direct_call(weighting: str, share_phase: bool) -> None:
    roles = parameter_roles(Tiny())
    updates = _updates()
    strategy = PFAStrategy(roles, rounds=10, start=0.6, end=0.9, share_phase=share_phase, weighting=weighting)
    result = strategy.aggregate(4, updates)
    site_weights = (
        {site: float(u.num_samples) for site, u in updates.items()} if weighting == "samples" else None
    )
    direct = pfa_aggregate(
        {site: u.weights for site, u in updates.items()},
        roles,
        pfa_ratio(4, 10, 0.6, 0.9),
        site_weights,
        share_phase,
    )
    for site in direct:
        assert result.weights[site].keys() == direct[site].keys()
        for key, value in direct[site].items():
            assert torch.equal(result.weights[site][key], value)


def test_pfa_strategy_rejects_bad_schedule() -> None:
    with pytest.raises(ConfigError, match="PFA"):
        PFAStrategy({}, rounds=0)
    with pytest.raises(ConfigError, match="PFA"):
        PFAStrategy({}, rounds=5, end=1.5)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("prr", PFAStrategy),
        ("pfa_only", PFAStrategy),
        ("prr_ce", PFAStrategy),
        ("fedavg", FedAvg),
        ("fedprox", FedAvg),
        ("fml", FedAvg),
        ("fedavg_det", FedAvg),
        ("fedbn", FedBN),
        ("silobn", SiloBN),
        ("fedper", FedPer),
        ("fedrep", FedPer),
        ("fedproto", PrototypeOnly),
    ],
)
def test_build_strategy_maps_methods(method: str, expected: type) -> None:
    strategy = build_strategy(method, Tiny(), rounds=5)
    assert type(strategy) is expected


def test_build_strategy_local_options_and_errors() -> None:
    assert build_strategy("local", Tiny(), rounds=5) is None
    strategy = build_strategy(
        "prr", Tiny(), rounds=5, weighting="samples", start=0.5, prototype_mode="gaussian"
    )
    assert isinstance(strategy, PFAStrategy) and strategy.weighting == "samples" and strategy.start == 0.5
    assert strategy.roles == parameter_roles(Tiny())
    assert build_strategy("fedbn", Tiny(), rounds=5, weighting="uniform").weighting == "uniform"
    with pytest.raises(ConfigError, match="unknown method"):
        build_strategy("fedsgd", Tiny(), rounds=5)
    with pytest.raises(ConfigError, match="start"):
        build_strategy("fedavg", Tiny(), rounds=5, start=0.5)
    with pytest.raises(ConfigError, match="weighting"):
        build_strategy("fedavg", Tiny(), rounds=5, weighting="by_size")


def test_key_filtered_strategy_on_a_model_without_such_keys() -> None:
    no_statistics = nn.Sequential()
    no_statistics.add_module("norm", nn.GroupNorm(2, 4))
    no_statistics.add_module("final_classifier", nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="SiloBN.*normalisation statistics"):
        build_strategy("silobn", no_statistics, rounds=5)
    assert build_strategy("fedbn", no_statistics, rounds=5).local_keys == {"norm.weight", "norm.bias"}


@pytest.mark.parametrize("method", ["prr", "fedbn"])
def test_batchnorm_unet_keeps_every_sites_norm_entries_under_pfa_and_fedbn(method: str) -> None:
    """The BatchNorm UNet (`norm: batch`): roles by module type find its BatchNorm layers, and PFA and FedBN
    leave each site's BatchNorm weights, biases, running statistics and counters as they were."""
    from medfl.federated.params import Role, keys_with_role
    from medfl.models import build_model

    torch.manual_seed(0)
    model = build_model("unet", "segmentation", 2, 1, width=0.25, norm="batch")
    batch_norms = {
        f"{prefix}.{key}" for prefix, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)
        for key in module.state_dict()
    }
    assert batch_norms and set(keys_with_role(parameter_roles(model), Role.NORM)) == batch_norms
    updates = {}
    for index in range(3):
        state = {k: (v + torch.randn_like(v) if v.is_floating_point() else v + index + 1)
                 for k, v in model.state_dict().items()}
        updates[f"site{index}"] = SiteUpdate(weights=state, num_samples=10 * (index + 1))
    strategy = build_strategy(method, model, rounds=4)
    merged = strategy.aggregate(1, updates).weights
    for site, update in updates.items():
        for key in batch_norms:
            assert torch.equal(merged[site][key], update.weights[key]), (site, key)
        shared = [k for k in update.weights if k not in batch_norms and update.weights[k].is_floating_point()]
        assert any(not torch.equal(merged[site][k], update.weights[k]) for k in shared)
