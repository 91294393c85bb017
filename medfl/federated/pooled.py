"""Pooled training, the centralised reference: one model trained on the union of every site's training split, in
this process, and scored at every site on its own validation and test splits, as local training is.

It is not federated learning: the sites' training data leave them (each site's audit log says so), which is why it
runs only in process (`medfl run`) and NVIDIA FLARE refuses it (medfl.nvflare.refuse_in_process_only). It is the
reference every federated benchmark shows beside its methods, not assumed to be a ceiling: under label shift a
site's own model can beat it.

Every site reads its data and builds its model from the common initialisation, as in a federation; the first
site's model becomes the one shared model, and every site holds the same `LocalTrainer` (so its restart state is
part of every site's, the same in each). One round is E epochs over the union with FedAvg's loss and optimizer (a
fresh optimizer every round, as for every method); after every epoch each site scores the model on its own
validation split, so metrics.csv, selection and summary read as for any method: one row set per site, model M.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from monai.utils import set_determinism

from medfl.federated.det import DetState
from medfl.federated.local_sites import LocalSites
from medfl.federated.payloads import Delivery
from medfl.federated.rounds import RoundReplies, SiteReply
from medfl.federated.site import PREFETCH_BATCHES, Site, derive_seed
from medfl.federated.training import TrainingDiverged

POOLED = "pooled"  # the name the union's own seeds derive from (data order)


class PooledSites(LocalSites):
    """The sites of an experiment, whose training splits train one shared model."""

    def start(self):
        statistics = super().start()
        sites = self._sites()
        self.trainer = sites[0].trainer
        for site in sites:
            site.pool_training_data(self.trainer)
        return statistics

    def train(self, round_: int, deliveries: Mapping[str, Delivery | None], upload: bool) -> RoundReplies:
        """One round: E epochs of the shared model over the union, every site scoring it after each."""
        sites = self._sites()
        for site in sites:
            self.progress("site", {"round": round_, "site": site.name})
            site.begin_round(round_, None)
        seconds = 0.0
        for epoch in range(1, self.config.local_epochs + 1):
            tick = time.perf_counter()
            try:
                losses = self.trainer.epoch(round_, epoch, DetState.START, self._union_loader(sites, round_, epoch))
            except TrainingDiverged as error:
                raise TrainingDiverged(f"pooled training, round {round_}, epoch {epoch}: {error}") from None
            seconds += time.perf_counter() - tick
            for site in sites:
                site.end_epoch(round_, epoch, losses)
        total = sum(len(site.datasets["train"]) for site in sites)
        replies = RoundReplies()
        for site in sites:  # each site is charged with its share of the training, by its training samples
            site.end_round(round_, seconds * len(site.datasets["train"]) / total)
            replies.replies[site.name] = SiteReply(report=site.evaluate().metrics or {})
            site.save_state()
        return replies

    def _sites(self) -> list[Site]:
        return list(self.by_name.values())

    def _union_loader(self, sites: list[Site], round_: int, epoch: int):
        """Batches drawn from every site's cached training split, shuffled together; each site's augmentation
        seeded from (seed, site, round, epoch) as when it trains alone, the order from (seed, pooled, round,
        epoch)."""
        from monai.data import ThreadDataLoader
        from torch import Generator
        from torch.utils.data import ConcatDataset

        seed = self.config.seed
        set_determinism(derive_seed(seed, POOLED, round_, epoch))
        for site in sites:
            site.train_transform.set_random_state(seed=derive_seed(seed, site.name, round_, epoch))
        union = ConcatDataset([site.datasets["train"] for site in sites])
        batch_size = self.config.batch_size
        generator = Generator().manual_seed(derive_seed(seed, POOLED, round_, epoch, "order"))
        drop_last = len(union) > batch_size and len(union) % batch_size == 1  # a batch of one breaks BatchNorm
        return ThreadDataLoader(union, buffer_size=PREFETCH_BATCHES, batch_size=batch_size, shuffle=True,
                                generator=generator, drop_last=drop_last, num_workers=0)
