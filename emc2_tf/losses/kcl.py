"""KCL, the kernel contrastive loss (Koromilas et al. ICML 2024; algorithms.md §7).

    L = −(2/M) Σ_i K(u_i, v_i) + γ · Σ_views 1/(M(M−1)) Σ_{i≠j} K(z_i, z_j)

with the Gaussian kernel `K(x, y) = exp(−t ‖x − y‖²)` (authors' defaults
t = 2, γ = 16); the energy term is taken within each view and summed over the
two views. The expected loss does not depend on the batch size. KCL has no
temperature.

Checked against the authors' code, pakoromilas/DHEL-KCL (commit dc5a477):
`losses.py`, `KCL.calculate_terms` (gaussian kernel branch, lines 111–113)
computes `energy = gaussian_kernel(z_anchor, t).mean() +
gaussian_kernel(z_pos, t).mean()` and `alignment = 2 * align_gaussian(z_anchor,
z_pos, t)`, and `KCL.forward` (line 99) returns `-alignment + gamma * energy`,
defaults `t=2.0, gamma=16.0` (line 75). In `utils.py`, `align_gaussian`
(lines 15–25) is `exp(−t ‖x_i − y_i‖²).mean()` over the M pairs, and
`gaussian_kernel` (lines 3–12) is the mean of `exp(−t ‖x_i − x_j‖²)` over
`torch.pdist`'s M(M−1)/2 pairs i < j, which equals our mean over the
M(M−1) ordered pairs i ≠ j (the kernel is symmetric). So the alignment
carries the factor 2 (one per view); without it γ = 16 would weigh the
energy like the authors' γ = 32. (The authors L2-normalise inside the loss;
here the encoder's output is already L2-normalised.)
"""

import keras
import tensorflow as tf

from emc2_tf.losses._common import check_views


def gaussian_kernel(x: tf.Tensor, y: tf.Tensor, t: float) -> tf.Tensor:
    """`exp(−t ‖x_i − y_j‖²)` for every pair, `[M, M]`."""
    squared = (
        tf.reduce_sum(x * x, axis=-1)[:, None]
        + tf.reduce_sum(y * y, axis=-1)[None, :]
        - 2.0 * tf.matmul(x, y, transpose_b=True)
    )
    return tf.exp(-t * tf.maximum(squared, 0.0))


@keras.saving.register_keras_serializable(package="emc2_tf")
def kcl_loss(
    view1: tf.Tensor, view2: tf.Tensor, t: float = 2.0, gamma: float = 16.0
) -> tf.Tensor:
    """KCL (Gaussian kernel) over the batch; `view1`, `view2`: `[M, D]` embeddings.

    Args:
        t: the kernel's scale t > 0 (authors' default 2).
        gamma: the energy term's weight γ > 0 (authors' default 16).
    """
    view1, view2 = check_views(view1, view2)
    m = tf.shape(view1)[0]
    # Factor 2: the authors' `alignment = 2 * align_gaussian(...)` (one per view).
    alignment = 2.0 * tf.reduce_mean(
        tf.exp(-t * tf.reduce_sum(tf.square(view1 - view2), axis=-1)))
    off_diagonal = 1.0 - tf.eye(m, dtype=view1.dtype)
    pairs = tf.cast(m * (m - 1), view1.dtype)
    energy = sum(
        tf.reduce_sum(gaussian_kernel(view, view, t) * off_diagonal) / pairs
        for view in (view1, view2)
    )
    return -alignment + gamma * energy
