"""EMC²'s `evaluate` on one device and on two mirrored replicas (run by the tests).

    python tests/evaluate_replicas_worker.py OUT.json

Not a test file: `tests/test_evaluate_replicas.py` runs it in a subprocess,
because splitting the CPU into 2 logical devices must happen before
TensorFlow initialises. One process computes both sides: the default
strategy runs on one of the two logical devices, MirroredStrategy on both.
Each variant's model is built once per strategy from the same seed (same
weights, checked) and evaluated on the same fixed held-out pairs.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

#: Held-out images, global batch, embedding size, τ.
NUM_IMAGES, BATCH_SIZE, DIM, TEMPERATURE = 48, 16, 8, 0.1

#: EMC² variants evaluated: the library default, and the paper's re-encoding
#: estimator with the exact ratio and without waste recycling.
VARIANTS = {
    "default": {},
    "reencode_exact": {"out_of_batch": "reencode", "exact_ratio": True,
                       "waste_recycling": False},
}


def held_out_pairs():
    """Fixed, un-augmented two-view pairs: the same batches on every pass."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.random((NUM_IMAGES, 4, 4, 1)).astype(np.float32)
    noise = lambda: rng.normal(scale=0.05, size=images.shape).astype(np.float32)  # noqa: E731
    pairs = {"index": np.arange(NUM_IMAGES, dtype=np.int32),
             "view1": np.clip(images + noise(), 0, 1), "view2": np.clip(images + noise(), 0, 1)}
    return images, tf.data.Dataset.from_tensor_slices(pairs).batch(BATCH_SIZE,
                                                                   drop_remainder=True)


def evaluate(strategy, variant, images, dataset):
    """`(weights, logs)` of a freshly built model of `variant` evaluated under `strategy`."""
    import keras

    import emc2_tf

    with strategy.scope():
        keras.utils.set_random_seed(0)
        encoder = keras.Sequential([
            keras.Input((4, 4, 1), name="images"), keras.layers.Flatten(),
            keras.layers.Dense(DIM), keras.layers.UnitNormalization()])
        model = emc2_tf.EMC2Model(encoder=encoder, dataset_size=NUM_IMAGES, images=images,
                                  temperature=TEMPERATURE, seed=0, **VARIANTS[variant])
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    logs = model.evaluate(dataset, verbose=0, return_dict=True)
    return [np.asarray(w) for w in encoder.get_weights()], {k: float(v) for k, v in logs.items()}


def main(argv):
    import emc2_tf

    emc2_tf.split_cpu(2)
    images, dataset = held_out_pairs()
    result = {}
    for variant in VARIANTS:
        runs = {}
        weights = []
        for name in ("default", "mirrored"):
            strategy = emc2_tf.make_strategy(name)
            run_weights, runs[name] = evaluate(strategy, variant, images, dataset)
            runs[name]["replicas"] = strategy.num_replicas_in_sync
            weights.append(run_weights)
        runs["same_weights"] = all(np.array_equal(a, b) for a, b in zip(*weights))
        result[variant] = runs
    with open(argv[0], "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
