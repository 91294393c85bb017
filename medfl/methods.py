"""Every method medfl runs, as one table of switches over a single code path.

A method is described by what differs between methods: how many models a site trains, how they teach
each other, what the server does with the uploads, and which supervised loss is used. The site and the
coordinator read these switches; nothing else branches on the method's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal


class ModelRole(str, Enum):
    """The models a site trains, named as files and reports name them (metrics.csv's `model` column)."""

    PERSONALIZED = "P"  # two-model methods: never sent, never overwritten; the site's deliverable
    DEPUTY = "D"  # two-model methods: sent to the server and overwritten by what it returns
    SINGLE = "M"  # one-model methods: sent (if the method communicates), overwritten and used

    def __str__(self) -> str:
        return self.value


Aggregation = Literal["pfa", "fedavg", "fedbn", "silobn", "fedper", "prototypes"]
Distillation = Literal["det", "mutual"]


@dataclass(frozen=True)
class MethodSpec:
    """The switches of one method."""

    name: str
    two_models: bool  # P (personalised, never sent) and D (deputy, sent and overwritten)
    distillation: Distillation | None  # "det": DET's state machine; "mutual": always Exchange (FML)
    aggregation: Aggregation | None  # None: no communication at all (local training)
    loss: Literal["cpa", "ce"]  # supervised loss; segmentation adds soft Dice to either
    proximal: bool = False  # FedProx: mu/2 ||w - w_received||^2 on the receiving model
    personal_proximal: bool = False  # Ditto: lambda/2 ||v - w_received||^2 on P, which starts from the global model
    pools_data: bool = False  # one model on the union of the sites' training data: in process only
    prototype_loss: bool = False  # FedProto: distance of features to the global class prototypes
    head_first: bool = False  # FedRep: train the local head with the body frozen, then the body
    description: str = ""

    @property
    def used_role(self) -> ModelRole:
        """The model a site uses and exports: P, or M for one-model methods."""
        return ModelRole.PERSONALIZED if self.two_models else ModelRole.SINGLE

    @property
    def receiving_role(self) -> ModelRole:
        """The model uploaded and overwritten by the server's weights: D, or M."""
        return ModelRole.DEPUTY if self.two_models else ModelRole.SINGLE

    @property
    def roles(self) -> tuple[ModelRole, ...]:
        """Every model a site trains, the used one first."""
        return (self.used_role, self.receiving_role) if self.two_models else (self.used_role,)

    @property
    def communicates(self) -> bool:
        return self.aggregation is not None

    @property
    def sends_weights(self) -> bool:
        return self.aggregation not in (None, "prototypes")


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("prr", True, "det", "pfa", "cpa", description="PFA + DET + CPA (the method)"),
        MethodSpec("local", False, None, None, "ce", description="each site alone, no communication"),
        MethodSpec("fedavg", False, None, "fedavg", "ce", description="FedAvg, sample-weighted"),
        MethodSpec("fedprox", False, None, "fedavg", "ce", proximal=True, description="FedProx"),
        MethodSpec("fedbn", False, None, "fedbn", "ce", description="FedBN: norm layers stay local"),
        MethodSpec("fml", True, "mutual", "fedavg", "ce", description="two models, mutual learning, FedAvg on D"),
        MethodSpec("fedavg_det", True, "det", "fedavg", "cpa", description="ablation: FedAvg instead of PFA"),
        MethodSpec("pfa_only", False, None, "pfa", "cpa", description="ablation: PFA, no DET (model replaced by S_k)"),
        MethodSpec("prr_ce", True, "det", "pfa", "ce", description="ablation: cross-entropy instead of CPA"),
        MethodSpec("silobn", False, None, "silobn", "ce", description="SiloBN: norm statistics stay local"),
        MethodSpec("fedper", False, None, "fedper", "ce", description="FedPer: shared body, local head"),
        MethodSpec("fedrep", False, None, "fedper", "ce", head_first=True,
                   description="FedRep: shared body, local head trained first"),
        MethodSpec("fedproto", False, None, "prototypes", "ce", prototype_loss=True,
                   description="FedProto: only class prototypes travel"),
        MethodSpec("ditto", True, None, "fedavg", "ce", personal_proximal=True,
                   description="Ditto: D is FedAvg's model; P learns with lambda/2 ||P - D_received||^2"),
        MethodSpec("pooled", False, None, None, "ce", pools_data=True,
                   description="centralised reference: one model on the union of the sites' training data "
                               "(in process only)"),
    )
}


def method_spec(name: str) -> MethodSpec:
    """The switches of method `name`; ValueError listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}") from None
