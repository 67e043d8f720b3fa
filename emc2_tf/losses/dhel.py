"""DHEL, the decoupled hyperspherical energy loss (Koromilas et al. ICML 2024; algorithms.md §6).

With `u_i`, `v_i` the two views' embeddings of image `i` in a batch of M:

    ℓ_i = −β u_iᵀv_i + log Σ_{j≠i} exp(β u_iᵀu_j)  [+ log Σ_{j≠i} exp(β v_iᵀv_j)]

only same-view negatives: the uniformity (energy) term is decoupled from the
positive. `symmetric=True` (default, as the authors' code) adds the bracket.
"""

import keras
import tensorflow as tf

from emc2_tf.losses._common import check_views, masked_logsumexp


@keras.saving.register_keras_serializable(package="emc2_tf")
def dhel_loss(
    view1: tf.Tensor, view2: tf.Tensor, temperature: float = 0.3, symmetric: bool = True
) -> tf.Tensor:
    """DHEL over the batch; `view1`, `view2`: `[M, D]` L2-normalised embeddings."""
    view1, view2 = check_views(view1, view2)
    beta = tf.convert_to_tensor(1.0 / temperature, dtype=view1.dtype)
    not_self = ~tf.eye(tf.shape(view1)[0], dtype=tf.bool)
    loss = -beta * tf.reduce_sum(view1 * view2, axis=-1)
    loss += masked_logsumexp(beta * tf.matmul(view1, view1, transpose_b=True), not_self)
    if symmetric:
        loss += masked_logsumexp(beta * tf.matmul(view2, view2, transpose_b=True), not_self)
    return tf.reduce_mean(loss)
