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

from emc2_tf.models import METHODS  # noqa: E402  (light: no data loaded)

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
flags.DEFINE_float("temperature", 0.07, "Temperature τ > 0 (β = 1/τ; paper: 0.07).")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("seed", 0, "Seed of weights, data order, augmentations and MH draws.")
flags.DEFINE_enum("encoder", "auto", ["auto", "small_cnn", "resnet18"],
                  "Encoder; auto = small_cnn up to 28 px, resnet18 above.")
flags.DEFINE_integer("burn_in", -1, "EMC² burn-in steps per pass; -1 = B − 1 (paper).")
flags.DEFINE_bool("exact_ratio", False, "EMC²: refresh the current state's score before each pass.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_integer("eval_every", 10, "Log held-out 1-NN accuracy every N epochs (0 = off).")
flags.DEFINE_string("export_dir", "savedmodels", "Export root (TF Serving layout).")
flags.DEFINE_string("model_name", None, "Exported model's name; default = --method.")
flags.DEFINE_string("tensorboard_dir", "runs", "TensorBoard logs go to <tensorboard_dir>/<model_name>; empty = off.")
flags.DEFINE_bool("export", True, "Export the trained encoder.")

flags.register_validator("temperature", lambda v: v > 0, "--temperature must be > 0 (e.g. 0.07).")
flags.register_validator("batch_size", lambda v: v >= 2, "--batch_size must be ≥ 2.")
flags.register_validator("epochs", lambda v: v >= 1, "--epochs must be ≥ 1.")
flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be > 0.")
flags.register_validator("burn_in", lambda v: v >= -1, "--burn_in must be -1 (B − 1) or ≥ 0.")
flags.register_validator("eval_every", lambda v: v >= 0, "--eval_every must be ≥ 0.")


def fail(message: str) -> None:
    """Exits with a one-line error instead of a stack trace."""
    print(f"train: error: {message}", file=sys.stderr)
    sys.exit(2)


def run() -> dict:
    import keras

    import emc2_tf

    started = time.time()
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
    encoder = emc2_tf.build_encoder(encoder_name, data.image_shape)

    options = {}
    if FLAGS.method == "emc2":
        options = dict(
            images=data.train_images,
            burn_in=None if FLAGS.burn_in < 0 else FLAGS.burn_in,
            exact_ratio=FLAGS.exact_ratio,
        )
    try:
        model = emc2_tf.build_model(
            FLAGS.method, encoder=encoder, dataset_size=data.num_train,
            temperature=FLAGS.temperature, seed=FLAGS.seed, **options,
        )
    except ValueError as error:
        fail(str(error))
    model.compile(optimizer=keras.optimizers.Adam(FLAGS.learning_rate),
                  jit_compile=FLAGS.jit_compile)
    dataset = emc2_tf.make_two_view_dataset(
        data.train_images, FLAGS.batch_size,
        emc2_tf.AugmentConfig.for_dataset(FLAGS.dataset), seed=FLAGS.seed,
    )
    callbacks = []
    if FLAGS.eval_every:
        callbacks.append(emc2_tf.KNNAccuracyCallback(encoder, data, FLAGS.eval_every))
    if FLAGS.tensorboard_dir:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(FLAGS.tensorboard_dir, model_name)))

    print(f"Pre-training {encoder_name} with {FLAGS.method} on {data.name}: "
          f"N={data.num_train}, B={FLAGS.batch_size}, τ={FLAGS.temperature}, "
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
        "temperature": FLAGS.temperature,
        "knn_accuracy": results["knn_accuracy"],
        "linear_probe_accuracy": results["linear_probe_accuracy"],
        "train_seconds": train_seconds,
        "final_loss": history.history["loss"][-1],
    }
    if "acceptance_rate" in history.history:
        summary["acceptance_rate"] = history.history["acceptance_rate"][-1]
    if data.num_train <= 20000:
        summary["global_contrastive_loss"] = emc2_tf.exact_global_contrastive_loss(
            encoder, data.train_images, FLAGS.temperature
        )
    if FLAGS.export:
        summary["export_path"] = emc2_tf.export_encoder(encoder, FLAGS.export_dir, model_name)
    summary["total_seconds"] = time.time() - started

    print(f"held-out 1-NN accuracy:        {summary['knn_accuracy']:.4f}")
    print(f"held-out linear-probe accuracy: {summary['linear_probe_accuracy']:.4f}")
    if "acceptance_rate" in summary:
        print(f"MH acceptance rate (last epoch): {summary['acceptance_rate']:.4f}")
    if "global_contrastive_loss" in summary:
        print(f"exact global contrastive loss:  {summary['global_contrastive_loss']:.4f}")
    print(f"training time: {train_seconds:.1f} s")
    if FLAGS.export:
        print(f"exported encoder: {summary['export_path']}")
    print("summary: " + json.dumps(summary, sort_keys=True))
    return summary


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    logging.set_verbosity(logging.WARNING)
    run()


if __name__ == "__main__":
    app.run(main)
