"""Contrastive objectives (one module each)."""

from emc2_tf.losses.global_contrastive import (
    exact_global_contrastive_loss,
    global_contrastive_loss,
)
