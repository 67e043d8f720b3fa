"""One finite-augmentation EMC² step on one device and on two mirrored replicas.

    python tests/finite_replicas_worker.py OUT.json

Not a test file: `tests/test_emc2_finite.py` runs it in a subprocess, because
splitting the CPU into 2 logical devices must happen before TensorFlow
initialises. Both sides start from the same weights, stored-view table and
chains, and draw the same MH uniforms for the same anchor view (each replica
takes the columns of its own images). Writes the written-back chains (and,
under the strategy, each replica's copy of them) and the loss as JSON.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

#: Images, stored views per image, global batch, τ.
NUM_IMAGES, NUM_VIEWS, BATCH_SIZE, TEMPERATURE = 10, 3, 4, 0.25


def inputs():
    """The table, batch, view numbers, chains and draws both sides use."""
    rng = np.random.default_rng(0)
    table = rng.integers(0, 256, (NUM_IMAGES * NUM_VIEWS, 2, 2, 1)).astype(np.uint8)
    index = np.array([3, 0, 7, 5], np.int32)
    first = rng.integers(0, NUM_VIEWS, BATCH_SIZE)
    view_index = np.stack([first, (first + rng.integers(1, NUM_VIEWS, BATCH_SIZE)) % NUM_VIEWS],
                          axis=1).astype(np.int32)
    rows = np.concatenate([index * NUM_VIEWS + view_index[:, 0],
                           index * NUM_VIEWS + view_index[:, 1]])
    chain_index = np.full(NUM_IMAGES * NUM_VIEWS, -1, np.int32)
    chain_log_score = np.full(NUM_IMAGES * NUM_VIEWS, -np.inf, np.float32)
    # Half the batch's chains on a stored view of another image (stale score 1e3:
    # the exact ratio re-scores it), the others empty.
    for row in rows[::2]:
        chain_index[row] = (row + 2 * NUM_VIEWS) % (NUM_IMAGES * NUM_VIEWS)
        chain_log_score[row] = 1e3
    uniforms = rng.random((2, 2 * BATCH_SIZE, BATCH_SIZE)).astype(np.float32)
    return table, index, view_index, chain_index, chain_log_score, uniforms


def step(strategy, data):
    """`(chain_index, chain_log_score, per-replica chain tables, loss)` after one step."""
    import keras
    import tensorflow as tf

    import emc2_tf

    table, index, view_index, chain_index, chain_log_score, uniforms = data
    replicas = strategy.num_replicas_in_sync
    b = BATCH_SIZE // replicas
    with strategy.scope():
        keras.utils.set_random_seed(0)
        encoder = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten(),
                                    keras.layers.Dense(3), keras.layers.UnitNormalization()])
        model = emc2_tf.EMC2Model(encoder=encoder, dataset_size=NUM_IMAGES, images=table,
                                  temperature=TEMPERATURE, seed=0, finite_augmentations=NUM_VIEWS,
                                  out_of_batch="reencode", exact_ratio=True, scan="sequential")
    model.chain_index.assign(chain_index)
    model.chain_log_score.assign(chain_log_score)
    draws = tf.constant(uniforms)

    def fixed_draws(shape):
        first = tf.distribute.get_replica_context().replica_id_in_sync_group * b
        return tf.gather(draws, tf.range(first, first + b), axis=-1)

    model.random_uniform = fixed_draws
    pixels = table.astype(np.float32) / np.float32(255.0)

    def shard(context):
        lo = context.replica_id_in_sync_group * b
        own = slice(lo, lo + b)
        rows = np.concatenate([index[own] * NUM_VIEWS + view_index[own, 0],
                               index[own] * NUM_VIEWS + view_index[own, 1]])
        return (tf.constant(index[own]), tf.constant(pixels[rows]),
                tf.constant(view_index[own]))

    per_replica = strategy.experimental_distribute_values_from_function(shard)

    @tf.function
    def run(values):
        def replica_step(index, views, view_index):
            return model.contrastive_loss(index, model.encoder(views),
                                          view_index=view_index)[0]
        return strategy.run(replica_step, args=values)

    losses = strategy.experimental_local_results(run(per_replica))
    copies = [v.numpy().tolist()
              for v in strategy.experimental_local_results(model.chain_index.value)]
    return (model.chain_index.numpy().tolist(), model.chain_log_score.numpy().tolist(), copies,
            float(np.mean([float(x) for x in losses])))


def main(out_path):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    data = inputs()
    one = step(tf.distribute.OneDeviceStrategy(devices[0]), data)
    two = step(tf.distribute.MirroredStrategy(devices), data)
    result = {name: {"chain_index": r[0], "chain_log_score": r[1], "copies": r[2], "loss": r[3]}
              for name, r in (("one_device", one), ("two_replicas", two))}
    result["initial_chain_index"] = data[3].tolist()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
