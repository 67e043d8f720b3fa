"""Small fixtures shared by the tests: fixed-embedding "images" and a frozen encoder."""

import keras
import numpy as np


def fixed_embeddings(num_images: int, dim: int, seed: int = 0) -> np.ndarray:
    """Random unit vectors, float64 `[N, D]`."""
    z = np.random.default_rng(seed).normal(size=(num_images, dim))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def embedding_images(embeddings: np.ndarray) -> np.ndarray:
    """The embeddings stored as 1x1 "images" `[N, 1, 1, D]` (float32)."""
    return embeddings.astype(np.float32).reshape(len(embeddings), 1, 1, -1)


def frozen_encoder(dim: int) -> keras.Model:
    """An encoder with no weights: reads the embedding back out of the image."""
    return keras.Sequential(
        [keras.Input((1, 1, dim)), keras.layers.Reshape((dim,)), keras.layers.UnitNormalization()]
    )


def exact_softmax(embeddings: np.ndarray, anchor: int, temperature: float) -> np.ndarray:
    """π(j) = exp(β s_aj) / Σ_{k≠a} exp(β s_ak), float64, π(a) = 0."""
    logits = embeddings @ embeddings[anchor] / temperature
    logits[anchor] = -np.inf
    p = np.exp(logits - logits.max())
    return p / p.sum()
