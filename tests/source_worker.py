"""One worker of a two-worker cluster training from a read-counting image source
(run by `tests/test_source_pipeline.py`).

    python tests/source_worker.py OUT.npz   (TF_CONFIG names the cluster and this worker)

Not a test file: joining a MultiWorkerMirroredStrategy cluster must happen
before TensorFlow initialises. The worker trains one epoch of EMC² twice from
the same seed: once from `make_two_view_dataset(...).take(steps)` (a
transformed dataset: every worker reads every image, as before issue 18) and
once from the dataset itself (`ContrastiveModel.fit` hands each worker its
own rows). It saves the sample indices its source read and the weights of
each run.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

NUM_IMAGES, BATCH_SIZE, IMAGE_SHAPE = 48, 16, (6, 6, 3)


def counting_source(images):
    """An `ArraySource` of `images` that records every sample index it reads."""
    import tensorflow as tf

    from emc2_tf.data.image_source import ArraySource

    class CountingSource(ArraySource):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.indices_read = []

        def _record(self, index):
            self.indices_read.extend(int(i) for i in index)
            return index

        def read(self, index):
            index = tf.numpy_function(self._record, [tf.cast(index, tf.int64)], tf.int64,
                                      stateful=True)
            return super().read(tf.ensure_shape(index, [None]))

    return CountingSource(images, name="counted")


def main(argv):
    out = argv[0]
    import emc2_tf
    import keras

    strategy = emc2_tf.make_strategy("multi_worker", worker_timeout=60.0)
    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, *IMAGE_SHAPE), np.uint8)
    source = counting_source(images)
    steps = NUM_IMAGES // BATCH_SIZE
    state = {"replicas": strategy.num_replicas_in_sync,
             "batches": emc2_tf.RandomBatchOrder(NUM_IMAGES, BATCH_SIZE, seed=0).epoch_batches(0)}
    for path in ("every_image", "own_rows"):
        dataset = emc2_tf.make_two_view_dataset(source, BATCH_SIZE, emc2_tf.AugmentConfig(),
                                                seed=0)
        if path == "every_image":
            dataset = dataset.take(steps)  # no worker_dataset: the pre-issue-18 path
        with strategy.scope():
            keras.utils.set_random_seed(0)
            encoder = keras.Sequential([
                keras.Input(IMAGE_SHAPE, name="images"), keras.layers.Flatten(),
                keras.layers.Dense(8), keras.layers.UnitNormalization()])
            model = emc2_tf.EMC2Model(encoder, NUM_IMAGES, temperature=0.1, seed=0)
            model.compile(optimizer=keras.optimizers.SGD(0.5))
        del source.indices_read[:]
        model.fit(dataset, epochs=1, verbose=0)
        state[f"{path}.read"] = np.array(source.indices_read, np.int64)
        for position, weight in enumerate(model.weights):
            state[f"{path}.weight{position}"] = np.asarray(weight)
        state["weight_names"] = np.array([w.path.split("/", 1)[-1] for w in model.weights])
    np.savez(out, **state)
    print(f"saved {out}: {strategy.num_replicas_in_sync} replicas")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
