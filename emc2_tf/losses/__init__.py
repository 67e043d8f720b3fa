"""Contrastive objectives (one module each)."""

from emc2_tf.losses.global_contrastive import (
    exact_global_contrastive_loss,
    global_contrastive_loss,
)
from emc2_tf.losses.dcl import dcl_loss
from emc2_tf.losses.finite_global import finite_global_loss
from emc2_tf.losses.dhel import dhel_loss
from emc2_tf.losses.kcl import gaussian_kernel, kcl_loss
from emc2_tf.losses.nt_xent import nt_xent_loss
from emc2_tf.losses.sogclr import (
    sogclr_batch_estimate,
    sogclr_moving_average,
    sogclr_surrogate_loss,
)
