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


def parse_summary(stdout: str) -> dict:
    """The JSON of the `summary: {...}` line `trainers.train` prints last."""
    return json.loads(re.search(r"^summary: (.*)$", stdout, re.M).group(1))
