r"""Pre-train an encoder with a contrastive method, evaluate it, export it.

    python -m trainers.train --method=emc2 --dataset=digits --epochs=30

Steps: load the data set (no download), build the two-view pipeline and the
encoder, `model.fit` with a progress bar (TensorBoard scalars under
`--tensorboard_dir`), report the held-out 1-NN and linear-probe accuracy, export the
encoder to `<export_dir>/<model_name>/<version>/` for TF Serving.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from emc2_tf.batch_selection import BATCH_SELECTIONS  # noqa: E402
from emc2_tf.distribute import STRATEGIES  # noqa: E402
from emc2_tf.models import METHODS, method_options  # noqa: E402  (light: no data loaded)

FLAGS = flags.FLAGS

flags.DEFINE_enum("method", "emc2", sorted(METHODS), "Contrastive method.")
flags.DEFINE_string(
    "dataset", "digits",
    "digits (inside scikit-learn) | fashion_mnist (idx files, Debian's "
    "dataset-fashion-mnist) | the name of a tfds data set prepared under --data_dir.",
)
flags.DEFINE_string(
    "data_dir", None,
    "fashion_mnist: folder of the idx files (default /usr/share/datasets/fashion-mnist); "
    "tfds data sets: the tfds data_dir. Never downloads.",
)
flags.DEFINE_integer("epochs", 30, "Training epochs.")
flags.DEFINE_integer("batch_size", 64, "Images per batch B (2B views).")
flags.DEFINE_float(
    "temperature", None,
    "Temperature τ > 0 (β = 1/τ); default: the method's own (emc2 0.07, sogclr 0.1, "
    "simclr 0.1, dcl 0.1, dhel 0.3; kcl has none and uses it only for the global-loss monitor, 0.1).",
)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("seed", 0, "Seed of weights, data order, augmentations and MH draws.")
flags.DEFINE_enum("encoder", "auto", ["auto", "small_cnn", "resnet18"],
                  "Encoder; auto = small_cnn up to 28 px, resnet18 above.")
flags.DEFINE_integer("burn_in", -1, "emc2 only: MH burn-in steps per pass; -1 = B − 1 (paper).")
flags.DEFINE_bool("exact_ratio", False, "emc2 only: refresh the current state's score before each pass.")
flags.DEFINE_float("gamma", 0.9, "sogclr only: moving-average rate γ of u, in (0, 1] (paper 0.9).")
flags.DEFINE_enum("batch_selection", "random", list(BATCH_SELECTIONS),
                  "random: uniform shuffling; spectral: spectral-clustering batches (Cho et al.), "
                  "any method.")
flags.DEFINE_integer("spectral_every", 1, "spectral only: re-select the batches every k epochs.")
flags.DEFINE_integer("spectral_groups", 40, "spectral only: batches per clustered group (authors: 40).")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_enum("strategy", "default", list(STRATEGIES),
                  "default: one device; mirrored: every local GPU (or --cpu_devices logical "
                  "CPUs); multi_worker: MultiWorkerMirroredStrategy over TF_CONFIG's workers. "
                  "--batch_size is the global batch, split over the replicas.")
flags.DEFINE_integer("cpu_devices", 0,
                     "Split the CPU into this many logical devices (0 = no split): runs "
                     "--strategy=mirrored with several replicas on a machine without GPUs.")
flags.DEFINE_float("worker_timeout", 120.0,
                   "multi_worker: seconds to wait for the other workers, and the timeout of "
                   "each collective operation.")
flags.DEFINE_integer("eval_every", 10, "Log held-out 1-NN accuracy every N epochs (0 = off).")
flags.DEFINE_string("export_dir", "savedmodels", "Export root (TF Serving layout).")
flags.DEFINE_string("model_name", None, "Exported model's name; default = --method.")
flags.DEFINE_string("tensorboard_dir", "runs", "TensorBoard logs go to <tensorboard_dir>/<model_name>; empty = off.")
flags.DEFINE_bool("export", True, "Export the trained encoder.")

flags.register_validator("temperature", lambda v: v is None or v > 0,
                         "--temperature must be > 0 (e.g. 0.07).")
flags.register_validator("gamma", lambda v: 0 < v <= 1, "--gamma must be in (0, 1] (e.g. 0.9).")
flags.register_validator("spectral_every", lambda v: v >= 1, "--spectral_every must be ≥ 1.")
flags.register_validator("spectral_groups", lambda v: v >= 1, "--spectral_groups must be ≥ 1.")
flags.register_validator("batch_size", lambda v: v >= 2, "--batch_size must be ≥ 2.")
flags.register_validator("epochs", lambda v: v >= 1, "--epochs must be ≥ 1.")
flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be > 0.")
flags.register_validator("burn_in", lambda v: v >= -1, "--burn_in must be -1 (B − 1) or ≥ 0.")
flags.register_validator("cpu_devices", lambda v: v >= 0, "--cpu_devices must be ≥ 0.")
flags.register_validator("worker_timeout", lambda v: v > 0, "--worker_timeout must be > 0.")
flags.register_validator("eval_every", lambda v: v >= 0, "--eval_every must be ≥ 0.")


def fail(message: str) -> None:
    """Exits with a one-line error instead of a stack trace."""
    print(f"train: error: {message}", file=sys.stderr)
    sys.exit(2)


#: Flags that configure one method's constructor option: flag → (option, value).
METHOD_FLAGS = {
    "burn_in": ("burn_in", lambda v: None if v < 0 else v),
    "exact_ratio": ("exact_ratio", bool),
    "gamma": ("gamma", float),
}


def check_method_flags(method: str) -> None:
    """Refuses a method-specific flag given for a method that has no such option."""
    accepted = method_options(method)
    for flag, (option, _) in METHOD_FLAGS.items():
        if FLAGS[flag].present and option not in accepted:
            users = sorted(m for m in METHODS if option in method_options(m))
            fail(f"--{flag} is not an option of --method={method}; it applies to "
                 f"--method={'|'.join(users)}.")


def method_arguments(method: str, data) -> dict:
    """The constructor options `method` declares, filled from the flags and data."""
    accepted = method_options(method)
    arguments = {"seed": FLAGS.seed}
    if "images" in accepted:
        arguments["images"] = data.train_images
    if FLAGS.temperature is not None:
        arguments["temperature"] = FLAGS.temperature
    for flag, (option, convert) in METHOD_FLAGS.items():
        if option in accepted:
            arguments[option] = convert(FLAGS[flag].value)
    return arguments


def state_digest(model) -> str:
    """A SHA-256 of the model's weights and per-sample state (to compare runs and workers)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight)).tobytes())
    return digest.hexdigest()[:16]


def run() -> dict:
    import keras
    import numpy as np

    import emc2_tf

    started = time.time()
    if FLAGS.cpu_devices:
        try:
            emc2_tf.split_cpu(FLAGS.cpu_devices)
        except (RuntimeError, ValueError) as error:
            fail(f"--cpu_devices={FLAGS.cpu_devices}: {error}")
    try:
        strategy = emc2_tf.make_strategy(FLAGS.strategy, worker_timeout=FLAGS.worker_timeout)
    except ValueError as error:
        fail(f"--strategy={FLAGS.strategy}: {error}")
    replicas = strategy.num_replicas_in_sync
    if FLAGS.batch_size % replicas:
        fail(f"--batch_size={FLAGS.batch_size} (the global batch) is not divisible by the "
             f"{replicas} replicas of --strategy={FLAGS.strategy}; use a multiple of {replicas}.")
    chief = emc2_tf.is_chief(strategy)
    keras.utils.set_random_seed(FLAGS.seed)
    try:
        data = emc2_tf.load_dataset(FLAGS.dataset, FLAGS.data_dir)
    except (FileNotFoundError, ValueError) as error:
        fail(f"--dataset={FLAGS.dataset}: {error}")
    if FLAGS.batch_size > data.num_train:
        fail(f"--batch_size={FLAGS.batch_size} exceeds the {data.num_train} training images.")
    model_name = FLAGS.model_name or FLAGS.method
    encoder_name = FLAGS.encoder
    if encoder_name == "auto":
        encoder_name = "small_cnn" if max(data.image_shape[:2]) <= 28 else "resnet18"
    with strategy.scope():
        encoder = emc2_tf.build_encoder(encoder_name, data.image_shape)
        try:
            model = emc2_tf.build_model(
                FLAGS.method, encoder=encoder, dataset_size=data.num_train,
                **method_arguments(FLAGS.method, data),
            )
        except ValueError as error:
            fail(str(error))
        model.compile(optimizer=keras.optimizers.Adam(FLAGS.learning_rate),
                      jit_compile=FLAGS.jit_compile)
    temperature = model.temperature
    augment = emc2_tf.AugmentConfig.for_dataset(FLAGS.dataset)
    epoch_seconds = []
    # First in the list: an epoch's time includes the batch selection, not the evaluation.
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epoch_seconds.append(-time.time()),
        on_epoch_end=lambda epoch, logs: epoch_seconds.__setitem__(
            -1, epoch_seconds[-1] + time.time()),
    )
    callbacks, batch_order = [timer], None
    if FLAGS.batch_selection == "spectral":
        try:
            batch_order = emc2_tf.SpectralBatchSelection(
                data.train_images, FLAGS.batch_size, temperature=temperature,
                every_k_epochs=FLAGS.spectral_every, groups_k=FLAGS.spectral_groups,
                augment=augment, seed=FLAGS.seed,
            )
        except ValueError as error:
            fail(f"--batch_selection=spectral: {error}")
        callbacks.append(batch_order)
    dataset = emc2_tf.make_two_view_dataset(
        data.train_images, FLAGS.batch_size, augment, seed=FLAGS.seed, batch_order=batch_order,
    )
    if FLAGS.eval_every:
        callbacks.append(emc2_tf.KNNAccuracyCallback(encoder, data, FLAGS.eval_every))
    if FLAGS.tensorboard_dir and chief:  # one writer per cluster
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(FLAGS.tensorboard_dir, model_name)))

    monitor_global_loss = data.num_train <= 20000  # the exact loss is O(N²)
    initial_global_loss = None
    if monitor_global_loss:
        initial_global_loss = emc2_tf.exact_global_contrastive_loss(
            encoder, data.train_images, temperature)
    print(f"Pre-training {encoder_name} with {FLAGS.method} on {data.name}: "
          f"N={data.num_train}, B={FLAGS.batch_size}, τ={temperature}, "
          f"{FLAGS.batch_selection} batches, {replicas} replica(s), "
          f"{FLAGS.epochs} epochs")
    train_started = time.time()
    # A live progress bar on a terminal; one line per epoch in a log file.
    verbose = 1 if sys.stdout.isatty() else 2
    history = model.fit(dataset, epochs=FLAGS.epochs, callbacks=callbacks, verbose=verbose)
    train_seconds = time.time() - train_started

    results = emc2_tf.evaluate_encoder(encoder, data)
    summary = {
        "method": FLAGS.method,
        "dataset": data.name,
        "epochs": FLAGS.epochs,
        "batch_size": FLAGS.batch_size,
        "temperature": temperature,
        "batch_selection": FLAGS.batch_selection,
        "knn_accuracy": results["knn_accuracy"],
        "linear_probe_accuracy": results["linear_probe_accuracy"],
        "train_seconds": train_seconds,
        # Median over epochs after the first (which includes tracing the step).
        "seconds_per_epoch": float(np.median(epoch_seconds[1:] or epoch_seconds)),
        "final_loss": history.history["loss"][-1],
    }
    if "acceptance_rate" in history.history:
        summary["acceptance_rate"] = history.history["acceptance_rate"][-1]
    if monitor_global_loss:
        summary["initial_global_contrastive_loss"] = initial_global_loss
        summary["global_contrastive_loss"] = emc2_tf.exact_global_contrastive_loss(
            encoder, data.train_images, temperature
        )
    summary["strategy"] = FLAGS.strategy
    summary["replicas"] = replicas
    summary["state_digest"] = state_digest(model)
    if FLAGS.export and chief:  # the other workers hold identical weights
        summary["export_path"] = emc2_tf.export_encoder(encoder, FLAGS.export_dir, model_name)
    summary["total_seconds"] = time.time() - started

    print(f"held-out 1-NN accuracy:        {summary['knn_accuracy']:.4f}")
    print(f"held-out linear-probe accuracy: {summary['linear_probe_accuracy']:.4f}")
    if "acceptance_rate" in summary:
        print(f"MH acceptance rate (last epoch): {summary['acceptance_rate']:.4f}")
    if "global_contrastive_loss" in summary:
        print(f"exact global contrastive loss:  {initial_global_loss:.4f} before training, "
              f"{summary['global_contrastive_loss']:.4f} after")
    print(f"training time: {train_seconds:.1f} s "
          f"({summary['seconds_per_epoch']:.2f} s per epoch, median)")
    if "export_path" in summary:
        print(f"exported encoder: {summary['export_path']}")
    print("summary: " + json.dumps(summary, sort_keys=True))
    return summary


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    logging.set_verbosity(logging.WARNING)
    check_method_flags(FLAGS.method)
    run()


if __name__ == "__main__":
    app.run(main)
