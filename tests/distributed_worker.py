"""Trains a few steps under a distribution strategy and saves the state (run by the tests).

    python tests/distributed_worker.py OUT.npz --strategy=mirrored --method=emc2 [...]

Not a test file: `tests/test_distribute.py` runs it in subprocesses, because
splitting the CPU into logical devices, or joining a MultiWorkerMirroredStrategy
cluster, must happen before TensorFlow initialises.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--strategy", default="default")
    parser.add_argument("--cpu_devices", type=int, default=2)
    parser.add_argument("--method", default="emc2")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--worker_timeout", type=float, default=60.0)
    parser.add_argument("--scan", default="auto", help="emc2: EMC2Model(scan=...)")
    parser.add_argument("--scan_block_size", type=int, default=0,
                        help="emc2: candidates per block of scan=blocked (0: the library's)")
    parser.add_argument("--fixed_draws", action="store_true",
                        help="emc2: MH uniforms from one fixed [steps, 2, 2B, B] table, each "
                             "replica taking its own chains' columns, so runs with any replica "
                             "count see the same draws per image")
    return parser.parse_args(argv)


def use_fixed_draws(model, steps, batch_size):
    """Replaces `model.random_uniform` (the only source of MH draws) by a fixed table."""
    import tensorflow as tf

    table = tf.constant(np.random.default_rng(1).random(
        (max(steps, 1), 2, 2 * batch_size, batch_size)).astype(np.float32))

    def fixed_draws(shape):
        context = tf.distribute.get_replica_context()
        replica = 0 if context is None else context.replica_id_in_sync_group
        chains = tf.cast(shape[2], tf.int32)
        first = tf.cast(replica, tf.int32) * chains
        draws = tf.gather(table, model.optimizer.iterations)  # this step's [2, 2B, B]
        return tf.gather(draws, tf.range(first, first + chains), axis=2)

    model.random_uniform = fixed_draws


def replica_draws(strategy, model):
    """Each replica's `model.random_uniform([2, 4, 3])`, stacked `[replicas, 2, 4, 3]`."""
    draws = strategy.run(lambda: model.random_uniform([2, 4, 3]))
    return np.stack([np.asarray(d) for d in strategy.experimental_local_results(draws)])


def local_values(variable):
    """Every replica's copy of a (possibly mirrored) Keras variable, as arrays."""
    inner = getattr(variable, "_value", variable)
    values = getattr(inner, "values", None)
    if values is None:
        return [np.asarray(inner)]
    return [np.asarray(v) for v in values]


def main(argv):
    args = parse_args(argv)
    import emc2_tf
    from emc2_tf.samplers import metropolis_hastings

    if args.scan_block_size:
        metropolis_hastings.SCAN_BLOCK_SIZE = args.scan_block_size

    if args.strategy == "mirrored":
        emc2_tf.split_cpu(args.cpu_devices)
    import keras

    strategy = emc2_tf.make_strategy(args.strategy, worker_timeout=args.worker_timeout)
    rng = np.random.default_rng(0)
    images = rng.random((args.num_images, 4, 4, 1)).astype(np.float32)
    keras.utils.set_random_seed(0)
    dataset = emc2_tf.make_two_view_dataset(images, args.batch_size, augment=None, seed=0)
    dataset = dataset.take(max(args.steps, 1))
    with strategy.scope():
        keras.utils.set_random_seed(0)
        encoder = keras.Sequential([
            keras.Input((4, 4, 1), name="images"), keras.layers.Flatten(),
            keras.layers.Dense(8), keras.layers.UnitNormalization(),
        ])
        options = {"images": images, "scan": args.scan} if args.method == "emc2" else {}
        if args.method == "cache":
            options = {"images": images}
        model = emc2_tf.build_model(args.method, encoder=encoder, dataset_size=len(images),
                                    temperature=args.temperature, seed=0, **options)
        model.compile(optimizer=keras.optimizers.SGD(0.5))
    if args.fixed_draws:
        use_fixed_draws(model, args.steps, args.batch_size)
    loss = np.nan
    if args.steps:
        loss = model.fit(dataset, epochs=1, verbose=0).history["loss"][-1]
    state = {"replicas": strategy.num_replicas_in_sync, "loss": loss}
    if args.method == "emc2" and not args.fixed_draws:  # after training: changes nothing above
        state["mh_draws_per_replica"] = replica_draws(strategy, model)
    for weight in model.weights:
        name = weight.path.replace("/", ".")
        copies = local_values(weight)
        state[name] = copies[0]
        state[name + ".copies"] = np.stack(copies)
    np.savez(args.out, **state)
    print(f"saved {args.out}: {strategy.num_replicas_in_sync} replicas")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
