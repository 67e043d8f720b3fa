"""Small fixtures shared by the tests: fixed-embedding "images" and a frozen encoder."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixed_embeddings(num_images: int, dim: int, seed: int = 0) -> np.ndarray:
    """Random unit vectors, float64 `[N, D]`."""
    z = np.random.default_rng(seed).normal(size=(num_images, dim))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def embedding_images(embeddings: np.ndarray) -> np.ndarray:
    """The embeddings stored as 1x1 "images" `[N, 1, 1, D]` (float32), mapped
    from [−1, 1] to pixel values `(z + 1) / 2` in [0, 1] (images must lie there)."""
    return ((embeddings.astype(np.float32) + 1) / 2).reshape(len(embeddings), 1, 1, -1)


def frozen_encoder(dim: int) -> keras.Model:
    """An encoder with no weights: reads the embedding back out of an `embedding_images` image."""
    return keras.Sequential(
        [keras.Input((1, 1, dim)), keras.layers.Rescaling(2.0, offset=-1.0),
         keras.layers.Reshape((dim,)), keras.layers.UnitNormalization()]
    )


def exact_softmax(embeddings: np.ndarray, anchor: int, temperature: float) -> np.ndarray:
    """π(j) = exp(β s_aj) / Σ_{k≠a} exp(β s_ak), float64, π(a) = 0."""
    logits = embeddings @ embeddings[anchor] / temperature
    logits[anchor] = -np.inf
    p = np.exp(logits - logits.max())
    return p / p.sum()


def numeric_gradient(fn, u: np.ndarray, v: np.ndarray, h: float = 1e-6) -> list:
    """Central differences of `fn(u, v)` w.r.t. `u` and `v` (float64)."""
    grads = []
    for which in (0, 1):
        base = [u.copy(), v.copy()]
        grad = np.zeros_like(base[which])
        for idx in np.ndindex(grad.shape):
            plus = [b.copy() for b in base]
            minus = [b.copy() for b in base]
            plus[which][idx] += h
            minus[which][idx] -= h
            grad[idx] = (fn(*plus) - fn(*minus)) / (2 * h)
        grads.append(grad)
    return grads


def run_python(args, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    """Runs `python ARGS` with the checkout importable; output captured as text."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def untrained_scores(argv, linear_probe: bool = True, global_loss: bool = False) -> dict:
    """What `python -m trainers.train ARGV` scores *before* any training.

    Builds the run the trainer builds (`trainers.common.build_run`: same flags,
    same data, same seed, hence the same initial weights) and evaluates its
    encoder as the trainer's summary does (`evaluate_encoder`: held-out 1-NN
    `knn_accuracy`, `linear_probe_accuracy`). With `global_loss`, also
    `initial_global_contrastive_loss`, which the trainer reports too: equal
    values prove the two encoders start from the same weights.

    A trained run's accuracy only means something above these: a small
    untrained CNN already scores 0.89–0.92 (1-NN) on digits.
    """
    from absl import flags

    import emc2_tf
    from trainers.common import build_run
    from trainers.run_flags import define_train_flags

    run_flags = flags.FlagValues()
    define_train_flags(run_flags)
    run_flags(["train", *argv])
    run = build_run("train", run_flags)
    scores = emc2_tf.evaluate_encoder(run.encoder, run.data, linear_probe=linear_probe)
    if global_loss:
        scores["initial_global_contrastive_loss"] = float(emc2_tf.exact_global_contrastive_loss(
            run.encoder, run.data.train_images, run.model.temperature))
    return scores


def parse_summary(stdout: str) -> dict:
    """The JSON of the `summary: {...}` line `trainers.train` prints last."""
    return json.loads(re.search(r"^summary: (.*)$", stdout, re.M).group(1))
