"""One local epoch: supervised losses, DET's pairing, FedProx/FedProto terms, FedRep freezing, divergence."""

import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader
from torch import nn

from medfl.config import DataSettings, load_site_config
from medfl.data import build_dataset, load_recipe, load_site
from medfl.data.tensors import plain_tensors
from medfl.federated.cpa import PrototypeAccumulator
from medfl.federated.det import DetState
from medfl.federated.training import (
    EpochPlan,
    TrainingDiverged,
    prototype_distance,
    proximal_term,
    train_epoch,
)
from medfl.tasks import task_for


def SupervisedLoss(task, kind, counts):  # noqa: N802 - reads like the loss classes it builds
    return task_for(task).supervised_loss(kind, counts, 0.8)


class Tiny(nn.Module):
    def __init__(self, features=4, classes=3):
        super().__init__()
        self.body = nn.Linear(5, features)
        self.final_classifier = nn.Linear(features, classes)

    def forward(self, x):
        features = self.body(x)
        return self.final_classifier(features), features


def batches(n=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(size, 5, generator=g), "label": torch.randint(0, 3, (size,), generator=g)}
            for _ in range(n)]


def test_cross_entropy_kinds_match_torch():
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    ce = SupervisedLoss("classification", "ce", torch.ones(3))
    assert ce(logits, target) == pytest.approx(float(F.cross_entropy(logits, target)))
    cpa = SupervisedLoss("classification", "cpa", torch.ones(3))  # equal counts, gamma 1: CPA is CE
    assert cpa(logits, target) == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-6)
    seg = SupervisedLoss("segmentation", "ce", torch.ones(2))
    logits, mask = torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 1, 8, 8))
    from monai.losses import DiceLoss
    by_hand = F.cross_entropy(logits, mask[:, 0]) + DiceLoss(include_background=False, to_onehot_y=True,
                                                             softmax=True, batch=True)(logits, mask)
    assert float(seg(logits, mask)) == float(by_hand), "MONAI's DiceCELoss: exactly CE + soft Dice"


def test_proximal_and_prototype_terms_by_hand():
    model = Tiny()
    received = {k: v.detach() + 1.0 for k, v in model.state_dict().items()}
    count = sum(p.numel() for p in model.parameters())
    assert float(proximal_term(model, received).detach()) == pytest.approx(count)
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    prototypes = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    present = torch.tensor([True, True, False])
    assert float(prototype_distance(features, torch.tensor([0, 1]), prototypes, present)) == pytest.approx(1.25)
    assert float(prototype_distance(features, torch.tensor([2, 2]), prototypes, present)) == 0.0


def test_two_models_step_on_their_own_losses_and_feed_prototypes():
    torch.manual_seed(0)
    models = {"P": Tiny(), "D": Tiny()}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    optimizers = {n: torch.optim.SGD(m.parameters(), lr=0.1) for n, m in models.items()}
    accumulator = PrototypeAccumulator(3)
    plan = EpochPlan(state=DetState.RECOVER, accumulator=accumulator)
    losses = train_epoch(models, optimizers, batches(), SupervisedLoss("classification", "ce", torch.ones(3)),
                         plan, task_for("classification"), torch.device("cpu"))
    assert set(losses) == {"P", "D"} and all(v > 0 for v in losses.values())
    for name, model in models.items():
        assert any(not torch.equal(before[name][k], v) for k, v in model.state_dict().items())
    assert int(accumulator.prototypes()[1].sum()) == 24


def test_fedrep_freezes_what_is_not_trainable_and_restores_it():
    model = Tiny()
    head = {k: v.clone() for k, v in model.final_classifier.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = EpochPlan(trainable=["body.weight", "body.bias"])
    train_epoch({"M": model}, {"M": optimizer}, batches(), SupervisedLoss("classification", "ce", torch.ones(3)),
                plan, task_for("classification"), torch.device("cpu"))
    assert all(torch.equal(head[k], v) for k, v in model.final_classifier.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_a_nan_loss_stops_the_epoch():
    model = Tiny()
    data = batches()
    data[1]["image"][0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="model M loss is nan"):
        train_epoch({"M": model}, {"M": torch.optim.SGD(model.parameters(), lr=0.1)}, data,
                    SupervisedLoss("classification", "ce", torch.ones(3)), EpochPlan(), task_for("classification"),
                    torch.device("cpu"))


def test_uncached_dermoscopy_records_load_without_metadata(ham10000_site):
    site = load_site_config(ham10000_site())
    data = load_site(site, DataSettings(classes=["nv", "bkl", "mel"], input_size=32, num_workers=0),
                     task=task_for(site.task))
    for recipe in ("dermoscopy_train", "dermoscopy_eval"):
        dataset = build_dataset(data.splits["train"][:4], load_recipe(recipe, input_size=32), cache_rate=0.0)
        with plain_tensors():
            batch = next(iter(DataLoader(dataset, batch_size=4)))
        assert tuple(batch["image"].shape) == (4, 3, 32, 32)
