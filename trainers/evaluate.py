r"""Evaluate a trained encoder: held-out 1-NN and linear-probe accuracy, alignment,
uniformity and effective rank.

    python -m trainers.evaluate --checkpoint_dir=checkpoints/emc2
    python -m trainers.evaluate --checkpoint_dir=checkpoints/emc2 --checkpoint=checkpoints/emc2/ckpt-440
    python -m trainers.evaluate --saved_model=savedmodels/emc2/1 --dataset=digits

From a checkpoint the run's `flags.txt` rebuilds the model (method,
encoder, data set) and the frozen `backbone` features are evaluated, as
after training; from an exported SavedModel the `serving_default`
signature's `embedding` is. Prints one line per metric and a final
`evaluation: {...}` JSON line (also written to `--output_json`).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from trainers.common import (  # noqa: E402
    check_output_dirs,
    data_options,
    dataset_kind,
    define_checkpoint_flags,
    fail as _fail,
    load_data,
    load_trained_run,
)

PROGRAM = "evaluate"
FLAGS = flags.FLAGS
define_checkpoint_flags()
flags.DEFINE_string("saved_model", None,
                    "Evaluate an exported SavedModel version folder instead (its `embedding`).")
flags.DEFINE_string("dataset", None,
                    "Data set to evaluate on; default the run's (--saved_model: digits).")
flags.DEFINE_string("data_dir", None, "Its data folder; default the run's.")
flags.DEFINE_enum("features", "backbone", ["backbone", "embedding"],
                  "Checkpoints: evaluate the backbone representation (the papers' protocol) "
                  "or the L2-normalised embedding.")
flags.DEFINE_bool("linear_probe", True, "Also fit the linear probe (logistic regression).")
flags.DEFINE_string("projector_dir", None,
                    "Also write the held-out embeddings and labels here for TensorBoard's projector.")
flags.DEFINE_string("output_json", None, "Also write the results to this JSON file.")
flags.DEFINE_integer("seed", 0, "Seed of the augmented views that alignment compares.")


def fail(message: str):
    _fail(PROGRAM, message)


def saved_model_embedder(path: str):
    """`images -> embedding` through a SavedModel's serving_default signature."""
    import numpy as np
    import tensorflow as tf

    from emc2_tf.evaluation import float_batches  # arrays or sources, float per batch
    from emc2_tf.export import INPUT_NAME, OUTPUT_NAME, SIGNATURE

    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        fail(f"--saved_model={path} is not a SavedModel folder (no saved_model.pb); give a "
             "version folder such as savedmodels/emc2/1.")
    try:
        loaded = tf.saved_model.load(path)
        signature = loaded.signatures[SIGNATURE]
    except (OSError, ValueError, KeyError, tf.errors.OpError) as error:
        fail(f"--saved_model={path} cannot be loaded: {str(error).splitlines()[0]}")

    def embed(images, batch_size: int = 512):
        chunks = [signature(**{INPUT_NAME: batch})[OUTPUT_NAME].numpy()
                  for batch in float_batches(images, batch_size)]
        return np.concatenate(chunks)

    return embed


def other_data_options(run_flags, dataset: str, image_shape) -> dict:
    """The data options for evaluating a run on another `--dataset`/`--data_dir`:
    the run's own options when the kind of data set is the same (its splits,
    held-out share), and the run's image size for folders and TFDS."""
    kind = dataset_kind(dataset)
    options = data_options(run_flags) if kind == dataset_kind(run_flags.dataset) else {}
    if kind in ("folder", "tfds"):
        options["image_size"] = tuple(image_shape[:2])
    return options


def first_image(images):
    """Image 0 of an array or a source, as a batch of one."""
    import emc2_tf

    if isinstance(images, emc2_tf.ImageSource):
        return emc2_tf.SubsetSource(images, [0])
    return images[:1]


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    logging.set_verbosity(logging.WARNING)
    if (FLAGS.checkpoint_dir is None) == (FLAGS.saved_model is None):
        fail("give exactly one of --checkpoint_dir (a training run) or --saved_model (an export).")
    # Issue 13: the outputs can be written, before anything is loaded or computed.
    outputs = []
    if FLAGS.projector_dir:
        outputs.append(("projector_dir", FLAGS.projector_dir, FLAGS.projector_dir))
    if FLAGS.output_json:
        if os.path.isdir(FLAGS.output_json):
            fail(f"--output_json={FLAGS.output_json} is a folder; give a file name.")
        parent = os.path.dirname(os.path.abspath(FLAGS.output_json))
        outputs.append(("output_json", FLAGS.output_json, parent))
    check_output_dirs(PROGRAM, outputs)
    import emc2_tf

    results = {}
    if FLAGS.checkpoint_dir is not None:
        run_flags, run, path = load_trained_run(PROGRAM, FLAGS.checkpoint_dir, FLAGS.checkpoint)
        dataset = FLAGS.dataset or run_flags.dataset
        data_dir = FLAGS.data_dir if FLAGS.data_dir is not None else run_flags.data_dir
        if (dataset, data_dir) == (run_flags.dataset, run_flags.data_dir):
            data = run.data
        else:
            data = load_data(PROGRAM, dataset, data_dir,
                             **other_data_options(run_flags, dataset, run.data.image_shape))
        if data.image_shape != run.data.image_shape:
            fail(f"--dataset={dataset} has {data.image_shape} images; the encoder takes "
                 f"{run.data.image_shape}.")

        def embed(images):
            return emc2_tf.embed(run.encoder, images, features=FLAGS.features)

        def embed_output(images):  # the L2-normalised embedding, for the sphere metrics
            return emc2_tf.embed(run.encoder, images, features="embedding")

        results.update(checkpoint=path, method=run_flags.method, features=FLAGS.features,
                       global_step=int(run.model.optimizer.iterations.numpy()))
    else:
        dataset = FLAGS.dataset or "digits"
        data = load_data(PROGRAM, dataset, FLAGS.data_dir)
        embed = embed_output = saved_model_embedder(FLAGS.saved_model)
        results.update(saved_model=FLAGS.saved_model, features="embedding")
    unavailable = emc2_tf.evaluation_unavailable(data)
    if unavailable:
        fail(f"--dataset={dataset}: {unavailable}: the 1-NN and the linear probe need labelled "
             "training and held-out images.")
    # Images labelled -1 (TFDS' "no label", e.g. STL-10's unlabelled split) are left out.
    train_images, train_labels = emc2_tf.labelled_part(data.train_images, data.train_labels)
    test_images, test_labels = emc2_tf.labelled_part(data.test_images, data.test_labels)
    try:
        train, test = embed(train_images), embed(test_images)
    except emc2_tf.SourceReadError as error:
        fail(str(error))
    except Exception as error:  # e.g. a SavedModel for another image shape
        fail(f"embedding the {data.name} images failed: {str(error).splitlines()[0]}")
    results["dataset"] = data.name
    results["held_out_size"] = len(test_labels)
    results["knn_accuracy"] = emc2_tf.knn_accuracy(train, train_labels, test, test_labels)
    if FLAGS.linear_probe:
        results["linear_probe_accuracy"] = emc2_tf.linear_probe_accuracy(
            train, train_labels, test, test_labels)
    # Alignment (two augmented views), uniformity and effective rank of the embedding.
    results.update(emc2_tf.representation_metrics(
        embed_output, test_images, emc2_tf.AugmentConfig.for_dataset(dataset),
        seed=FLAGS.seed, embeddings=test if results["features"] == "embedding" else None))
    if FLAGS.projector_dir:
        results["projector"] = emc2_tf.export_projector(test, test_labels, FLAGS.projector_dir)
    print(f"held-out 1-NN accuracy:         {results['knn_accuracy']:.4f}")
    if "linear_probe_accuracy" in results:
        print(f"held-out linear-probe accuracy: {results['linear_probe_accuracy']:.4f}")
    print(f"alignment (lower: closer views): {results['alignment']:.4f}")
    print(f"uniformity (lower: more uniform): {results['uniformity']:.4f}")
    dimension = embed_output(first_image(test_images)).shape[1]
    print(f"effective rank (of D = {dimension}):     {results['effective_rank']:.2f}")
    if FLAGS.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output_json)), exist_ok=True)
        with open(FLAGS.output_json, "w") as handle:
            json.dump(results, handle, indent=2, sort_keys=True)
    print("evaluation: " + json.dumps(results, sort_keys=True))


def cli() -> None:
    """The `emc2-evaluate` console script (pyproject.toml): parses the flags, runs `main`."""
    from trainers.cli import run

    run(main, __doc__)


if __name__ == "__main__":  # python -m trainers.evaluate
    cli()
