"""The finite-augmentation batch contract: `view_index` reaches the methods that take it."""

import numpy as np
import pytest
import tensorflow as tf

from emc2_tf.data.batch import view_index_of
from emc2_tf.models.contrastive_model import ContrastiveModel
from tests.helpers import embedding_images, fixed_embeddings, frozen_encoder


class _Recorder(ContrastiveModel):
    """Records the `view_index` its `contrastive_loss` is given (eager)."""

    uses_view_index = True

    def contrastive_loss(self, index, embeddings, training=True, view_index=None):
        self.seen = None if view_index is None else view_index.numpy()
        return tf.reduce_sum(embeddings) * 0.0, {}


def _batch(with_view_index: bool):
    images = tf.constant(embedding_images(fixed_embeddings(4, 3)))
    batch = {"index": tf.range(4), "view1": images, "view2": images}
    if with_view_index:
        batch["view_index"] = tf.constant([[0, 1], [1, 0], [1, 2], [2, 0]], tf.int64)
    return batch


@pytest.mark.parametrize("with_view_index", [True, False])
def test_view_index_reaches_the_method(with_view_index):
    """Catches: the skeleton dropping `view_index` (a finite-augmentation method
    would then index chain rows of the wrong stored view), or inventing one."""
    model = _Recorder(frozen_encoder(3), dataset_size=4)
    model.compile(optimizer="sgd", run_eagerly=True)
    model.train_step(_batch(with_view_index))
    if with_view_index:
        np.testing.assert_array_equal(model.seen, [[0, 1], [1, 0], [1, 2], [2, 0]])
        assert model.seen.dtype == np.int32
    else:
        assert model.seen is None
    model.seen = "unset"
    model.test_step(_batch(with_view_index))
    assert (model.seen is None) != with_view_index


def test_bad_view_index_is_refused_in_one_line():
    """Catches: a view_index of the wrong shape passing silently."""
    with pytest.raises(ValueError, match=r"view_index must be an integer tensor \[B, 2\]"):
        view_index_of({"view_index": tf.zeros([4, 3], tf.int32)})
    with pytest.raises(ValueError, match="view_index must be"):
        view_index_of({"view_index": tf.zeros([4, 2], tf.float32)})


@pytest.mark.parametrize("bad_pair", [[0, 2], [1, 1], [-1, 0]])
def test_view_index_outside_the_stored_views_is_refused_under_xla(bad_pair):
    """Catches: a view_index outside [0, K), or two equal views, reaching an
    XLA-compiled step (which drops assertions and would gather another image's
    stored row) instead of one ValueError from the input pipeline."""
    import keras

    import emc2_tf

    images = tf.constant(embedding_images(fixed_embeddings(4, 3)))
    pairs = tf.constant([[0, 1], [1, 0], bad_pair, [1, 0]], tf.int32)
    dataset = tf.data.Dataset.from_tensors(
        {"index": tf.range(4), "view1": images, "view2": images, "view_index": pairs})
    model = emc2_tf.EMC2Model(frozen_encoder(3), dataset_size=4, finite_augmentations=2,
                              temperature=0.5, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    with pytest.raises(ValueError, match=r"view_index outside \[0, finite_augmentations=2\)"):
        model.fit(dataset, epochs=1, verbose=0)


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
