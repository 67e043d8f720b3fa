"""Contrastive models sharing one train_step skeleton, and their registry.

Adding a method = one module with a `ContrastiveModel` subclass + one line
in `METHODS`.
"""

from __future__ import annotations

from typing import Any

from emc2_tf.models.contrastive_model import ContrastiveModel
from emc2_tf.models.emc2 import EMC2Model

#: method name → model class; every class takes (encoder, dataset_size, ...).
METHODS: dict[str, type[ContrastiveModel]] = {
    "emc2": EMC2Model,
}


def build_model(method: str, **kwargs: Any) -> ContrastiveModel:
    """Builds the contrastive model registered under `method`."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; accepted: {', '.join(sorted(METHODS))}.")
    return METHODS[method](**kwargs)
