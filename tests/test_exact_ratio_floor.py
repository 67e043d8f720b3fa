"""`exact_ratio` at its floor: the refresh encodes only the chains that hold a negative.

The exact-ratio refresh (and `out_of_batch="reencode"`) re-encodes each chain's
stored negative with the current weights. A chain with none (every chain of a
batch in the first epoch) has nothing to re-encode; encoding a placeholder
image for it cost a forward pass of B images per step for nothing.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from emc2_tf.data.image_source import ArraySource
from emc2_tf.models import emc2 as emc2_module


class RecordingSource(ArraySource):
    """An in-memory source that records every index it is asked to read."""

    def __init__(self, images):
        super().__init__(images)
        self.reads = []

    def _gather(self, index):
        self.reads.append(np.asarray(index).tolist())
        return super()._gather(index)


def _model(images, table, out_of_batch="drop"):
    keras.utils.set_random_seed(0)
    # Pixels centred on 0: embeddings spread over the sphere, so a chain's score
    # depends on which negative it holds.
    encoder = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Rescaling(2.0, -1.0),
                                keras.layers.Flatten(), keras.layers.Dense(6),
                                keras.layers.UnitNormalization()])
    model = emc2_tf.EMC2Model(encoder=encoder, dataset_size=len(images), images=table,
                              temperature=0.1, seed=0, exact_ratio=True,
                              out_of_batch=out_of_batch)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    return model


def _batches(images, steps=2):
    return emc2_tf.make_two_view_dataset(images, 8, seed=0).take(steps)


@pytest.mark.parametrize("out_of_batch", ["drop", "reencode"])
def test_refresh_reads_only_the_chains_that_hold_a_negative(out_of_batch):
    """First step (all chains empty): nothing read. With 5 of the 8 batch chains
    holding a stored negative: exactly those 5 rows read, in batch order.

    Catches: a refresh that encodes every chain of the batch (placeholder image 0
    for the empty ones), or reads the wrong chains' rows.
    """
    rng = np.random.default_rng(0)
    images = rng.random((32, 4, 4, 1)).astype(np.float32)
    source = RecordingSource(images)
    model = _model(images, source, out_of_batch)
    model.fit(_batches(images, 1), epochs=1, verbose=0)
    assert all(read == [] for read in source.reads), source.reads

    batch = next(iter(_batches(images, 1)))
    index = batch["index"].numpy()
    chains = np.full(32, -1, np.int32)
    held = index[[0, 2, 3, 5, 7]]
    chains[held] = (held + 1) % 32
    model.chain_index.assign(chains)
    model.chain_log_score.assign(np.where(chains >= 0, 0.0, -np.inf).astype(np.float32))
    source.reads.clear()
    model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
    assert [r for r in source.reads if r] == [((held + 1) % 32).tolist()]


def test_skipping_empty_chains_trains_like_encoding_them_all(monkeypatch):
    """Two epochs of exact-ratio `reencode` training with the empty chains skipped
    and, forced, with every chain encoded (the XLA path): the same chains and,
    to float32 rounding, the same weights.

    Catches: re-encoded rows scattered back to the wrong chains (then the stored
    negatives' scores and the chains part ways).
    """
    rng = np.random.default_rng(1)
    images = rng.random((32, 4, 4, 1)).astype(np.float32)

    def train(force_dense):
        if force_dense:
            monkeypatch.setattr(emc2_module, "_in_xla_context", lambda: True)
        model = _model(images, images, "reencode")
        model.fit(_batches(images, 4), epochs=2, verbose=0)
        monkeypatch.undo()
        return model

    skipped, dense = train(False), train(True)
    np.testing.assert_array_equal(skipped.chain_index.numpy(), dense.chain_index.numpy())
    assert (skipped.chain_index.numpy() >= 0).sum() > 8  # chains were filled
    for got, want in zip(skipped.encoder.weights, dense.encoder.weights):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
