"""Server-side aggregation strategies: PFA, FedAvg and its key-filtered variants, FedProto's prototypes.

A strategy takes ``{site name: SiteUpdate}`` and returns an :class:`Aggregate`: the weights each site
loads, the global class counts (for CPA's mitigation factors) and the global class prototypes (for CPA's
refinement weights and FedProto). Every strategy computes counts and prototypes the same way; they differ
only in how weights are merged. Pure and engine-free: the in-process coordinator and the NVFlare
controller both call the same objects.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from medfl.errors import ConfigError
from medfl.federated.averaging import average_states, normalise_site_weights
from medfl.federated.cpa import global_prototypes
from medfl.federated.params import Role, classifier_keys, norm_statistics_keys, parameter_roles
from medfl.federated.pfa import pfa_aggregate, pfa_ratio
from medfl.methods import method_spec

WEIGHTINGS = ("samples", "uniform")


@dataclass
class SiteUpdate:
    """What one site uploads after its local epochs.

    ``weights`` is empty for prototype-only methods. ``prototype_counts`` marks absent classes with 0:
    a prototype row with count 0 is ignored whatever its values.
    """

    weights: dict[str, Tensor]
    num_samples: int
    class_counts: Tensor | None = None
    prototypes: Tensor | None = None
    prototype_counts: Tensor | None = None


@dataclass
class Aggregate:
    """What the server sends back: per-site weights and the federation's counts and prototypes."""

    weights: dict[str, dict[str, Tensor]]
    global_class_counts: Tensor | None = None
    global_prototypes: Tensor | None = None
    global_prototype_present: Tensor | None = None


class Strategy(ABC):
    """Base of all strategies: global class counts and prototypes, plus a method-specific weight merge.

    ``prototype_mode`` "gaussian" perturbs the global prototypes with noise from a generator seeded by
    ``seed``; its state is part of :meth:`state_dict`, so a resumed run draws the same noise.
    """

    def __init__(self, prototype_mode: str = "mean", seed: int = 0):
        self.prototype_mode = prototype_mode
        self._generator = torch.Generator().manual_seed(seed)

    def aggregate(self, round: int, updates: Mapping[str, SiteUpdate]) -> Aggregate:
        """Merge the updates of the 0-based ``round``."""
        if not updates:
            raise ValueError("no site updates to aggregate")
        for site, update in updates.items():
            if update.num_samples < 0:
                raise ValueError(f"site '{site}': num_samples must be >= 0, got {update.num_samples}")
        counts = _global_class_counts(updates)
        protos, present = self._global_prototypes(updates)
        return Aggregate(
            weights=self._merge_weights(round, updates),
            global_class_counts=counts,
            global_prototypes=protos,
            global_prototype_present=present,
        )

    @abstractmethod
    def _merge_weights(self, round: int, updates: Mapping[str, SiteUpdate]) -> dict[str, dict[str, Tensor]]:
        """The weights each site loads, keyed by site name."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue identically."""
        return {
            "strategy": type(self).__name__,
            "prototype_mode": self.prototype_mode,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the strategy type must match."""
        if state.get("strategy") != type(self).__name__:
            raise ValueError(f"saved strategy '{state.get('strategy')}' does not match {type(self).__name__}")
        self.prototype_mode = state["prototype_mode"]
        self._generator.set_state(state["generator"])

    def _global_prototypes(self, updates: Mapping[str, SiteUpdate]) -> tuple[Tensor | None, Tensor | None]:
        protos, counts = [], []
        for site, update in updates.items():
            if update.prototypes is None:
                continue
            if update.prototype_counts is None:
                raise ValueError(f"site '{site}': prototypes sent without prototype_counts")
            protos.append(update.prototypes)
            counts.append(update.prototype_counts)
        if not protos:
            return None, None
        return global_prototypes(protos, counts, self.prototype_mode, self._generator)


def _global_class_counts(updates: Mapping[str, SiteUpdate]) -> Tensor | None:
    """Sum of the sites' class counts; None when no site sends any, an error when only some do."""
    missing = [site for site, update in updates.items() if update.class_counts is None]
    if len(missing) == len(updates):
        return None
    if missing:
        raise ValueError(
            f"sites {', '.join(repr(s) for s in missing)}: no class counts, while other sites sent them"
        )
    counts = [torch.as_tensor(update.class_counts) for update in updates.values()]
    shapes = {tuple(c.shape) for c in counts}
    if len(shapes) != 1:
        raise ValueError(f"class counts differ in shape between sites: {sorted(shapes)}")
    return torch.stack([c.to(counts[0].device) for c in counts]).sum(0)


def _check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"site weighting must be one of {WEIGHTINGS}, got '{weighting}'")
    return weighting


def _site_weights(updates: Mapping[str, SiteUpdate], weighting: str) -> dict[str, float] | None:
    """Sample-count weights, or None for uniform."""
    if weighting == "uniform":
        return None
    return {site: float(update.num_samples) for site, update in updates.items()}


def _states(updates: Mapping[str, SiteUpdate]) -> dict[str, dict[str, Tensor]]:
    """The sites' weights, checked to share one key set."""
    states = {site: update.weights for site, update in updates.items()}
    first_site, first = next(iter(states.items()))
    for site, state in states.items():
        if state.keys() != first.keys():
            differ = sorted(set(state) ^ set(first))[:5]
            raise ValueError(f"site '{site}': weight keys differ from site '{first_site}' (e.g. {differ})")
    return states


class FedAvg(Strategy):
    """Weighted average of every entry, except ``local_keys`` which each site keeps.

    ``weighting`` "samples" weights sites by sample count (FedAvg's rule), "uniform" equally. Every site
    receives its own copy of the averaged tensors.
    """

    def __init__(
        self,
        weighting: str = "samples",
        *,
        local_keys: Iterable[str] = (),
        prototype_mode: str = "mean",
        seed: int = 0,
    ):
        super().__init__(prototype_mode, seed)
        self.weighting = _check_weighting(weighting)
        self.local_keys = frozenset(local_keys)

    def _merge_weights(self, round: int, updates: Mapping[str, SiteUpdate]) -> dict[str, dict[str, Tensor]]:
        states = _states(updates)
        sites = list(states)
        keys = list(states[sites[0]])
        unknown = self.local_keys.difference(keys)
        if unknown:
            raise ValueError(f"local keys not in the sites' weights: {sorted(unknown)[:5]}")
        weights = normalise_site_weights(sites, _site_weights(updates, self.weighting))
        averaged = average_states(states, weights, [key for key in keys if key not in self.local_keys])
        return {
            site: {
                key: states[site][key] if key in self.local_keys else averaged[key].clone() for key in keys
            }
            for site in sites
        }


class KeepLocalAverage(FedAvg):
    """FedAvg where a model-derived set of keys never leaves its site (the base of FedBN, SiloBN, FedPer)."""

    local_entries: ClassVar[str]  # what stays local, for error messages

    def __init__(
        self,
        local_keys: Iterable[str],
        weighting: str = "samples",
        *,
        prototype_mode: str = "mean",
        seed: int = 0,
    ):
        local_keys = frozenset(local_keys)
        if not local_keys:
            raise ValueError(f"{type(self).__name__} needs at least one local key")
        super().__init__(weighting, local_keys=local_keys, prototype_mode=prototype_mode, seed=seed)

    @staticmethod
    @abstractmethod
    def local_keys_of(model: nn.Module) -> set[str]:
        """The state-dict keys of ``model`` that stay at each site."""

    @classmethod
    def for_model(cls, model: nn.Module, **options: Any) -> KeepLocalAverage:
        """The strategy with the local keys of ``model``; ConfigError when the model has none."""
        local_keys = cls.local_keys_of(model)
        if not local_keys:
            raise ConfigError(
                f"{cls.__name__}: model {type(model).__name__} has no {cls.local_entries}, so nothing would "
                "stay local; use FedAvg, or a model that has them"
            )
        return cls(local_keys, **options)


class FedBN(KeepLocalAverage):
    """FedBN: every normalisation entry (weights, biases, statistics, counters) stays local."""

    local_entries = "normalisation entries"

    @staticmethod
    def local_keys_of(model: nn.Module) -> set[str]:
        return {key for key, role in parameter_roles(model).items() if role is Role.NORM}


class SiloBN(KeepLocalAverage):
    """SiloBN: normalisation statistics stay local; normalisation weights and biases are averaged."""

    local_entries = "normalisation statistics (running mean and variance)"

    @staticmethod
    def local_keys_of(model: nn.Module) -> set[str]:
        return norm_statistics_keys(model)


class FedPer(KeepLocalAverage):
    """FedPer and FedRep: the final classifier stays local, the body is averaged.

    FedRep differs from FedPer only in how a site trains (head first), not on the server.
    """

    local_entries = "final classifier entries"

    @staticmethod
    def local_keys_of(model: nn.Module) -> set[str]:
        return classifier_keys(model)


class PFAStrategy(Strategy):
    """Progressive Fourier aggregation with the low-frequency ratio scheduled from ``start`` to ``end``."""

    def __init__(
        self,
        roles: Mapping[str, Role],
        rounds: int,
        start: float,
        end: float,
        share_phase: bool = True,
        weighting: str = "uniform",
        *,
        prototype_mode: str = "mean",
        seed: int = 0,
    ):
        super().__init__(prototype_mode, seed)
        try:
            pfa_ratio(0, rounds, start, end)
        except ValueError as error:
            raise ConfigError(f"PFA schedule: {error}") from None
        self.roles = dict(roles)
        self.rounds = rounds
        self.start = start
        self.end = end
        self.share_phase = share_phase
        self.weighting = _check_weighting(weighting)

    def _merge_weights(self, round: int, updates: Mapping[str, SiteUpdate]) -> dict[str, dict[str, Tensor]]:
        ratio = pfa_ratio(round, self.rounds, self.start, self.end)
        site_weights = _site_weights(updates, self.weighting)
        return pfa_aggregate(_states(updates), self.roles, ratio, site_weights, self.share_phase)


class PrototypeOnly(Strategy):
    """FedProto: no weights travel; sites receive only the global prototypes and class counts.

    Weights that sites send anyway are ignored, and every site gets an empty weight dict back.
    """

    def _merge_weights(self, round: int, updates: Mapping[str, SiteUpdate]) -> dict[str, dict[str, Tensor]]:
        return {site: {} for site in updates}


_STRATEGIES: dict[str, type[Strategy]] = {
    "pfa": PFAStrategy,
    "fedavg": FedAvg,
    "fedbn": FedBN,
    "silobn": SiloBN,
    "fedper": FedPer,
    "prototypes": PrototypeOnly,
}
_SUPPLIED = {"roles", "rounds", "local_keys"}


def build_strategy(method: str, model: nn.Module, rounds: int, **options: Any) -> Strategy | None:
    """The server strategy of ``method`` (see medfl.methods) for ``model``; None for "local".

    ``options`` are the strategy's keyword settings (weighting, start, end, share_phase, prototype_mode,
    seed); one the strategy does not take raises ConfigError naming it.
    """
    try:
        aggregation = method_spec(method).aggregation
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if aggregation is None:
        return None
    cls = _STRATEGIES[aggregation]
    allowed = set(inspect.signature(cls).parameters) - _SUPPLIED
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"method '{method}': unknown option(s) {unknown}; valid: {sorted(allowed)}")
    if cls is PFAStrategy:
        return PFAStrategy(parameter_roles(model), rounds, **options)
    if issubclass(cls, KeepLocalAverage):
        return cls.for_model(model, **options)
    return cls(**options)
