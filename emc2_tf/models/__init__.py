"""Contrastive models sharing one train_step skeleton, and their registry.

Adding a method = one module (a `ContrastiveModel` subclass, or a loss
function for `InBatchContrastiveModel`) + one line in `METHODS`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from emc2_tf.losses.dcl import dcl_loss
from emc2_tf.losses.dhel import dhel_loss
from emc2_tf.losses.kcl import kcl_loss
from emc2_tf.losses.nt_xent import nt_xent_loss
from emc2_tf.models.contrastive_model import ContrastiveModel
from emc2_tf.models.emc2 import EMC2Model
from emc2_tf.models.in_batch import InBatchContrastiveModel


def _in_batch(loss_fn) -> Callable[..., ContrastiveModel]:
    return functools.partial(InBatchContrastiveModel, loss_fn=loss_fn)


#: method name → model factory; every factory takes (encoder, dataset_size, ...).
METHODS: dict[str, Callable[..., ContrastiveModel]] = {
    "emc2": EMC2Model,
    "simclr": _in_batch(nt_xent_loss),
    "dcl": _in_batch(dcl_loss),
    "dhel": _in_batch(dhel_loss),
    "kcl": _in_batch(kcl_loss),
}


def build_model(method: str, **kwargs: Any) -> ContrastiveModel:
    """Builds the contrastive model registered under `method`."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; accepted: {', '.join(sorted(METHODS))}.")
    return METHODS[method](**kwargs)
