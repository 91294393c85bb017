"""What travels between a site and the server, as typed objects; converted to MONAI's ExchangeObject (and
NVFlare's FLModel) only at the engine boundary.

Site -> server: `SiteUpdate` (medfl.federated.server): the deputy's weights, the sample count, class counts,
class prototypes and their counts. Server -> site: `Delivery`: the site's own weights and the federation's
class counts and prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from medfl.federated.server import Aggregate, SiteUpdate

if TYPE_CHECKING:  # MONAI FL loads only where a payload crosses into an engine
    from monai.fl.utils.exchange_object import ExchangeObject

_GLOBAL_KEYS = ("global_class_counts", "global_prototypes", "global_prototype_present")


@dataclass
class Delivery:
    """What the server sends one site: its own weights (None: keep its model) and the federation's statistics."""

    weights: dict[str, Tensor] | None = None
    global_class_counts: Tensor | None = None
    global_prototypes: Tensor | None = None
    global_prototype_present: Tensor | None = None

    @classmethod
    def from_aggregate(cls, aggregate: Aggregate, site: str) -> Delivery:
        return cls(aggregate.weights.get(site) or None, aggregate.global_class_counts,
                   aggregate.global_prototypes, aggregate.global_prototype_present)

    @property
    def statistics(self) -> dict[str, Tensor | None]:
        return {key: getattr(self, key) for key in _GLOBAL_KEYS}

    def to_exchange(self) -> ExchangeObject:
        from monai.fl.utils.exchange_object import ExchangeObject

        return ExchangeObject(weights=self.weights, statistics=self.statistics)

    @classmethod
    def from_exchange(cls, exchange: ExchangeObject | None) -> Delivery | None:
        if exchange is None:
            return None
        statistics = exchange.statistics or {}
        return cls(exchange.weights or None,
                   **{key: None if statistics.get(key) is None else torch.as_tensor(statistics[key])
                      for key in _GLOBAL_KEYS})

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of tensors (a checkpoint loads them with weights_only=True)."""
        return {"weights": self.weights, "statistics": self.statistics}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any] | None) -> Delivery | None:
        if state is None:
            return None
        return cls(state["weights"], **{key: state["statistics"].get(key) for key in _GLOBAL_KEYS})


def upload_to_exchange(update: SiteUpdate) -> ExchangeObject:
    """A site's upload as MONAI FL's ExchangeObject: weights, and every statistic (None ones left out)."""
    from monai.fl.utils.constants import WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    statistics: dict[str, Any] = {"num_samples": update.num_samples, "class_counts": update.class_counts}
    if update.prototypes is not None:
        statistics["prototypes"], statistics["prototype_counts"] = update.prototypes, update.prototype_counts
    return ExchangeObject(weights=update.weights, weight_type=WeightType.WEIGHTS, statistics=statistics)


def upload_from_exchange(exchange: ExchangeObject, device: torch.device | None = None) -> SiteUpdate:
    """The strategy's input from a site's ExchangeObject, its weights on the aggregation `device`."""
    statistics = exchange.statistics or {}
    return SiteUpdate(
        weights={key: value.to(device) if device is not None else value
                 for key, value in (exchange.weights or {}).items()},
        num_samples=int(statistics["num_samples"]),
        class_counts=statistics.get("class_counts"),
        prototypes=statistics.get("prototypes"),
        prototype_counts=statistics.get("prototype_counts"),
    )
