"""The papers' training recipe: LARS, warm-up + cosine learning rate, optimizers by name.

- `LARS`: layer-wise adaptive rate scaling (You et al. 2017) as in SimCLR's
  reference implementation; Keras has none.
- `learning_rate_schedule`: linear warm-up from 0, then cosine decay to 0
  (Keras' own `CosineDecay`); `epoch_learning_rate` sets it up in epochs.
- `build_optimizer("adam" | "adamw" | "sgd" | "lars", ...)`: what the CLI's
  `--optimizer` builds.

`weight_decay` follows the authors' (PyTorch) code: for `adam`, `sgd` and
`lars` it is an L2 term added to the gradient (`g ← g + wd·w`, then the
optimizer's own update), as `torch.optim.Adam(weight_decay=...)`,
`torch.optim.SGD(weight_decay=...)` and SimCLR's LARS do; `adamw` decays
decoupled from the gradient (`w ← w − lr·wd·w`, Keras' `AdamW`,
Loshchilov & Hutter 2019). Keras' own `weight_decay=` argument of
`Adam`/`SGD` is the decoupled form, i.e. it would make `adam` identical to
`adamw`; it is not used.
"""

from __future__ import annotations

import math
import re
from typing import Any

import keras
from keras import ops

from emc2_tf.checks import finite_number

#: `--optimizer` values.
OPTIMIZERS = ("adam", "adamw", "sgd", "lars")

#: SGD's momentum (SimCLR, MoCo, the authors' LARS).
SGD_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="emc2_tf")
class LARS(keras.optimizers.Optimizer):
    """LARS (You et al. 2017), the update of SimCLR's reference implementation.

    For each variable `w` with gradient `g` (after any cross-replica sum):

        if w is adapted (rank ≥ 2 and its path matches no
                         `exclude_from_layer_adaptation` pattern):
            g ← g + weight_decay · w
            trust_ratio = eta · ‖w‖ / ‖g‖    (1 if ‖w‖ = 0 or ‖g‖ = 0)
        else (biases, normalisation scales and offsets):
            trust_ratio = 1                  (and no weight decay)
        v ← momentum · v + lr · trust_ratio · g
        w ← w − v                            (nesterov: w ← w − (momentum · v + lr · trust_ratio · g))

    This is SimCLR's form (the learning rate inside the velocity). The
    authors' PyTorch LARS (and MAE's) keeps `v ← m·v + trust_ratio·g;
    w ← w − lr·v`: the two agree while the learning rate is constant and
    differ only in how a changing learning rate weights past gradients.

    The velocity `v` is one slot per variable (`momentums`), saved with the
    optimizer in checkpoints. Works inside `model.fit` and under
    `tf.distribute` strategies (the update runs per replica on the summed
    gradient, like Keras' `SGD`).

    Args:
        learning_rate: a float or a `keras.optimizers.schedules.LearningRateSchedule`.
        momentum: float in [0, 1).
        weight_decay: L2 coefficient ≥ 0 added to the gradient of adapted variables only.
        eta: the trust coefficient η > 0 (SimCLR and the authors: 0.001).
        nesterov: Nesterov momentum.
        exclude_from_layer_adaptation: regular expressions; a variable whose
            path (e.g. `"conv2d/kernel"`) matches one is treated like a bias
            (trust ratio 1, no weight decay). Rank-0/1 variables always are.
        **kwargs: the base `keras.optimizers.Optimizer` options (`name`,
            `clipnorm`, …; not its decoupled `weight_decay`).
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
        exclude_from_layer_adaptation: list[str] | tuple[str, ...] | None = None,
        name: str = "lars",
        **kwargs: Any,
    ):
        # The base class' `weight_decay` is the decoupled kind, applied to
        # every variable: this optimizer applies its own, so it passes None.
        super().__init__(learning_rate=learning_rate, name=name, weight_decay=None, **kwargs)
        momentum, weight_decay, eta = float(momentum), float(weight_decay), float(eta)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1); got {momentum}.")
        if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"LARS: weight_decay must be finite and ≥ 0; got {weight_decay}.")
        if not (math.isfinite(eta) and eta > 0.0):
            raise ValueError(f"LARS: eta must be finite and > 0; got {eta}.")
        self.momentum = momentum
        self.lars_weight_decay = weight_decay
        self.eta = eta
        self.nesterov = bool(nesterov)
        self.exclude_from_layer_adaptation = tuple(exclude_from_layer_adaptation or ())
        self._exclude_patterns = tuple(re.compile(p) for p in self.exclude_from_layer_adaptation)

    def _adapted(self, variable) -> bool:
        """Whether `variable` (a Keras variable) gets weight decay and a trust ratio."""
        if len(variable.shape) <= 1:
            return False
        path = getattr(variable, "path", None) or variable.name
        return not any(pattern.search(path) for pattern in self._exclude_patterns)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        # Decided on the Keras variables (which have a `path`); `update_step`
        # may receive the underlying tf.Variable (under a strategy).
        self._adaptation = tuple(self._adapted(variable) for variable in variables)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        gradient = ops.convert_to_tensor(ops.cast(gradient, dtype))
        if self._adaptation[index]:
            weights = ops.convert_to_tensor(variable)
            if self.lars_weight_decay:
                gradient = gradient + ops.cast(self.lars_weight_decay, dtype) * weights
            weight_norm = ops.sqrt(ops.sum(ops.square(weights)))
            gradient_norm = ops.sqrt(ops.sum(ops.square(gradient)))
            one = ops.ones_like(weight_norm)
            safe = ops.logical_and(weight_norm > 0, gradient_norm > 0)
            trust_ratio = ops.where(
                safe,
                ops.cast(self.eta, dtype) * weight_norm / ops.where(safe, gradient_norm, one),
                one,
            )
            scaled_learning_rate = learning_rate * trust_ratio
        else:
            scaled_learning_rate = learning_rate
        velocity = self.momentums[index]
        momentum = ops.cast(self.momentum, dtype)
        step = scaled_learning_rate * gradient
        self.assign(velocity, momentum * velocity + step)
        if self.nesterov:
            self.assign_sub(variable, momentum * velocity + step)
        else:
            self.assign_sub(variable, velocity)

    def get_config(self):
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            weight_decay=self.lars_weight_decay,
            eta=self.eta,
            nesterov=self.nesterov,
            exclude_from_layer_adaptation=list(self.exclude_from_layer_adaptation),
        )
        return config


class _L2OnGradient:
    """Adds `l2 · w` to each gradient before the optimizer's own update
    (PyTorch's coupled `weight_decay`); `l2 = 0` is the plain optimizer."""

    def __init__(self, *args: Any, l2: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        l2 = float(l2)
        if not (math.isfinite(l2) and l2 >= 0.0):
            raise ValueError(f"{type(self).__name__}: l2 must be finite and ≥ 0; got {l2}.")
        self.l2 = l2

    def update_step(self, gradient, variable, learning_rate):
        if self.l2:
            gradient = ops.add(
                ops.cast(gradient, variable.dtype),
                ops.multiply(ops.cast(self.l2, variable.dtype), ops.convert_to_tensor(variable)),
            )
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


@keras.saving.register_keras_serializable(package="emc2_tf")
class AdamL2(_L2OnGradient, keras.optimizers.Adam):
    """Keras' Adam with an L2 term `l2·w` added to the gradient: PyTorch's
    `torch.optim.Adam(weight_decay=l2)`, the authors' STL-10 optimizer."""


@keras.saving.register_keras_serializable(package="emc2_tf")
class SGDL2(_L2OnGradient, keras.optimizers.SGD):
    """Keras' SGD with an L2 term `l2·w` added to the gradient (before the
    momentum): PyTorch's `torch.optim.SGD(weight_decay=l2)`."""


def learning_rate_schedule(base_lr: float, total_steps: int,
                           warmup_steps: int) -> keras.optimizers.schedules.CosineDecay:
    """Linear warm-up from 0 to `base_lr` over `warmup_steps`, then cosine decay to 0.

    It is Keras' `CosineDecay(0.0, decay_steps=total_steps − warmup_steps,
    warmup_target=base_lr, warmup_steps=warmup_steps)`, whose value at
    optimizer step `s` (Keras evaluates it at `optimizer.iterations`
    before the update, so the update number s + 1 uses `lr(s)`) is

        lr(s) = base_lr · s / W                                   for s < W
        lr(s) = base_lr · ½ (1 + cos(π (s − W) / (T − W)))        for W ≤ s ≤ T
        lr(s) = 0                                                 for s > T

    with `W = warmup_steps`, `T = total_steps`. At step 0 the learning rate
    is exactly 0 (as in SimCLR's reference code): with a warm-up the first
    update moves no weights (Adam's moments and the LARS/SGD velocity still
    see that gradient, the latter multiplied by 0). The last update
    (s = T − 1) uses `base_lr · ½ (1 + cos(π (T − 1 − W)/(T − W)))`, not 0.
    `warmup_steps = 0` is a plain cosine decay from `base_lr`.

    Raises `ValueError` (one line, naming the argument) unless
    `base_lr` is finite and > 0 and `0 ≤ warmup_steps < total_steps`.
    """
    base_lr = finite_number(base_lr, "base_lr")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer ≥ 1; got {total_steps!r}.")
    if (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int)
            or not 0 <= warmup_steps < total_steps):
        raise ValueError(f"warmup_steps must be an integer in [0, total_steps={total_steps}); "
                         f"got {warmup_steps!r}.")
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=total_steps - warmup_steps,
        alpha=0.0,
        warmup_target=base_lr,
        warmup_steps=warmup_steps,
    )


def epoch_learning_rate(learning_rate: float, epochs: int, steps_per_epoch: int,
                        warmup_epochs: int = 0):
    """The learning rate of a run of `epochs` × `steps_per_epoch` steps: the constant
    `learning_rate` without warm-up, else `learning_rate_schedule` with
    `warmup_epochs` epochs of warm-up (what `--warmup_epochs` means)."""
    if not warmup_epochs:
        return learning_rate
    return learning_rate_schedule(learning_rate, epochs * steps_per_epoch,
                                  warmup_epochs * steps_per_epoch)


def build_optimizer(name: str, learning_rate: Any, weight_decay: float = 0.0,
                    **kwargs: Any) -> keras.optimizers.Optimizer:
    """The optimizer `--optimizer=name` trains with.

    - `adam`: `keras.optimizers.Adam`; with `weight_decay > 0`, `AdamL2`
      (the L2 term added to the gradient, as the authors' `torch.optim.Adam`).
    - `adamw`: `keras.optimizers.AdamW(weight_decay=...)` (decoupled decay).
    - `sgd`: `keras.optimizers.SGD(momentum=0.9)`; with `weight_decay > 0`,
      `SGDL2` (L2 term in the gradient, before the momentum).
    - `lars`: `LARS(momentum=0.9, eta=0.001, weight_decay=...)` (weight decay
      and trust ratio on rank ≥ 2 variables only).

    Args:
        name: one of `OPTIMIZERS`.
        learning_rate: a finite float > 0, or a
            `keras.optimizers.schedules.LearningRateSchedule` (e.g.
            `learning_rate_schedule(...)`).
        weight_decay: finite, ≥ 0.
        **kwargs: passed to the optimizer's constructor (e.g. `eta=` for LARS,
            `momentum=` for sgd/lars).

    Raises `ValueError` with one line naming the bad argument and what is accepted.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"name must be one of {'|'.join(OPTIMIZERS)}; got {name!r}.")
    if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        learning_rate = finite_number(learning_rate, "learning_rate")
    weight_decay = finite_number(weight_decay, "weight_decay", strictly_positive=False)
    if name == "adam":
        if weight_decay:
            return AdamL2(learning_rate=learning_rate, l2=weight_decay, **kwargs)
        return keras.optimizers.Adam(learning_rate=learning_rate, **kwargs)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay,
                                      **kwargs)
    if name == "sgd":
        kwargs.setdefault("momentum", SGD_MOMENTUM)
        if weight_decay:
            return SGDL2(learning_rate=learning_rate, l2=weight_decay, **kwargs)
        return keras.optimizers.SGD(learning_rate=learning_rate, **kwargs)
    kwargs.setdefault("momentum", SGD_MOMENTUM)
    return LARS(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
