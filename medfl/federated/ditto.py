"""Ditto (Li et al., ICML 2021) on a site's two models: D is the global model w, trained, uploaded and averaged
as in FedAvg; P is the personalised model v, which never leaves the site and is the one it uses.

Every round v learns on loss(v) + lambda/2 ||v - w_r||^2, where w_r is the global model the site received this
round, kept frozen (medfl.federated.training adds the term; the trainer keeps w_r in its restart state). This
module says what w_r is before any weights were delivered, and where v starts.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn


def start_from_global_model(personal: nn.Module, global_model: nn.Module,
                            received: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """The first global model a site holds, loaded into v (all of it: weights and normalisation statistics);
    returned as w_r.

    That is the weights just delivered, when there are some. In round 0 the server delivers none: every site
    builds the same w^0 from the experiment seed, so the site's own D is the round's global model. (P and D are
    both built from that initialisation, so v equals w^0 already; loading it says so rather than relying on it.)
    """
    first = dict(received) if received is not None else {
        key: value.detach().clone() for key, value in global_model.state_dict().items()}
    personal.load_state_dict(first)
    return first
