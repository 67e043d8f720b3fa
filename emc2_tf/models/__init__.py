"""Contrastive models sharing one train_step skeleton, and their registry.

Adding a method = one module (a `ContrastiveModel` subclass, or a loss
function for `InBatchContrastiveModel`) + one line in `METHODS`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from emc2_tf.checks import finite_number
from emc2_tf.losses.dcl import dcl_loss
from emc2_tf.losses.dhel import dhel_loss
from emc2_tf.losses.kcl import kcl_loss
from emc2_tf.losses.nt_xent import nt_xent_loss
from emc2_tf.models.cache import CacheModel
from emc2_tf.models.contrastive_model import ContrastiveModel
from emc2_tf.models.emc2 import EMC2Model, image_table
from emc2_tf.models.in_batch import InBatchContrastiveModel
from emc2_tf.models.sogclr import SogCLRModel


def _in_batch(loss_fn) -> Callable[..., ContrastiveModel]:
    return functools.partial(InBatchContrastiveModel, loss_fn=loss_fn)


def kcl_model(
    encoder,
    dataset_size: int,
    kcl_t: float = 2.0,
    kcl_gamma: float = 16.0,
    seed: int | None = None,
    **kwargs: Any,
) -> InBatchContrastiveModel:
    """KCL (algorithms.md §7) on the in-batch model: `kcl_loss(t=kcl_t, gamma=kcl_gamma)`.

    The options are named `kcl_t`, `kcl_gamma` (flags `--kcl_t`, `--kcl_gamma`)
    so that they never collide with SogCLR's moving-average `gamma`. Other
    keyword arguments (e.g. `temperature`, which KCL uses only for the
    global-loss monitor) go to `InBatchContrastiveModel`.

    Args:
        kcl_t: the Gaussian kernel's t, finite and > 0 (authors' default 2).
        kcl_gamma: the energy term's weight γ, finite and > 0 (authors' default 16).
    """
    loss_kwargs = {"t": finite_number(kcl_t, "kcl_t"),
                   "gamma": finite_number(kcl_gamma, "kcl_gamma")}
    return InBatchContrastiveModel(encoder, dataset_size, loss_fn=kcl_loss,
                                   loss_kwargs=loss_kwargs, seed=seed, **kwargs)


#: method name → model factory; every factory takes (encoder, dataset_size, ...).
METHODS: dict[str, Callable[..., ContrastiveModel]] = {
    "emc2": EMC2Model,
    "sogclr": SogCLRModel,
    "simclr": _in_batch(nt_xent_loss),
    "dcl": _in_batch(dcl_loss),
    "dhel": _in_batch(dhel_loss),
    "kcl": kcl_model,
    "cache": CacheModel,
}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; accepted: {', '.join(sorted(METHODS))}.")


def method_options(method: str) -> dict[str, Any]:
    """The constructor options `method` takes besides encoder and dataset_size.

    Returns `{name: default}`, e.g. `{'images': None, 'temperature': 0.07,
    'burn_in': None, ...}` for EMC²; `inspect.Parameter.empty` marks an
    option without a default. Front ends (the CLI) use it to pass each method
    only the options it declares, and to show its defaults.
    """
    _check_method(method)
    factory = METHODS[method]
    parameters = inspect.signature(factory).parameters
    options = {
        name: parameter.default
        for name, parameter in parameters.items()
        if name not in ("encoder", "dataset_size", "loss_fn", "kwargs", "loss_kwargs")
        and parameter.kind is not inspect.Parameter.VAR_KEYWORD
    }
    if options.get("temperature") is None and isinstance(factory, functools.partial):
        loss_fn = factory.keywords.get("loss_fn")
        loss_parameters = inspect.signature(loss_fn).parameters
        if "temperature" in loss_parameters:
            options["temperature"] = loss_parameters["temperature"].default
        else:
            del options["temperature"]  # the objective has no temperature (KCL)
    return options


def build_model(method: str, **kwargs: Any) -> ContrastiveModel:
    """Builds the contrastive model registered under `method`."""
    _check_method(method)
    return METHODS[method](**kwargs)
