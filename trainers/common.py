"""What `train`, `evaluate` and `export` share: one-line errors, and building a
run's data, encoder and model from its training flags."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from emc2_tf.data.image_source import SubsetSource
from emc2_tf.data.sources import BUILTIN_DATASETS
from emc2_tf.models import METHODS, image_table, method_options

#: Flags that configure one method's constructor option: flag → (option, value).
#: A flag given for a method whose factory lacks the option is refused
#: (`check_method_flags`); a value converted to None leaves the method's own
#: default. tests/test_input_checks.py audits every method × flag pair.
METHOD_FLAGS = {
    "temperature": ("temperature", lambda v: v),  # None: the method's own τ; KCL has none
    "burn_in": ("burn_in", lambda v: None if v < 0 else v),
    "exact_ratio": ("exact_ratio", bool),
    "out_of_batch": ("out_of_batch", str),
    "waste_recycling": ("waste_recycling", bool),
    "scan": ("scan", str),
    "gamma": ("gamma", float),
    "kcl_t": ("kcl_t", float),
    "kcl_gamma": ("kcl_gamma", float),
    "cache_refresh": ("cache_refresh", float),
    "cache_negatives": ("cache_negatives", int),
}


def fail(program: str, message: str) -> NoReturn:
    """Exits with a one-line error instead of a stack trace."""
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)


def unwritable_reason(path: str) -> str | None:
    """Why the folder `path` cannot be created or written, or None if it can.

    Probes without leaving anything behind: the deepest existing ancestor must
    be a folder in which a temporary file can be created (a real attempt, so
    it also holds for root, whom permission bits do not stop, and for
    read-only file systems).
    """
    import tempfile

    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(os.path.abspath(existing))
        if parent == os.path.abspath(existing):
            break
        existing = parent
    if not os.path.isdir(existing):
        return f"{existing} is a file, so the folder {path} cannot be created"
    try:
        with tempfile.TemporaryFile(prefix=".write-probe-", dir=existing):
            pass
    except OSError as error:
        return f"{existing} is not writable ({error.strerror or error})"
    return None


def check_output_dirs(program: str, outputs) -> None:
    """Fails with one line, before anything is built, for the first of
    `outputs` (`(flag, value, folder)` triples) that cannot be written."""
    for flag, value, folder in outputs:
        reason = unwritable_reason(folder)
        if reason:
            fail(program, f"--{flag}={value}: {reason}.")


def check_method_flags(program: str, run_flags) -> None:
    """Refuses a method-specific flag given for a method that has no such option
    (e.g. `--temperature` for KCL, whose loss has no temperature: it would be
    recorded and printed but change nothing), naming the methods that have it."""
    accepted = method_options(run_flags.method)
    for flag, (option, _) in METHOD_FLAGS.items():
        if run_flags[flag].present and option not in accepted:
            users = sorted(m for m in METHODS if option in method_options(m))
            fail(program, f"--{flag} is not an option of --method={run_flags.method}; it "
                          f"applies to --method={'|'.join(users)}.")


#: Flags that only act under another flag's value: flag → (the governing flag, the
#: values under which it acts). Given a non-default value otherwise, they would be
#: recorded in flags.txt and change nothing (issue 19): `check_flag_combinations`
#: refuses them. A default value passes, so a `--flagfile` repeat still parses.
DEPENDENT_FLAGS = {
    "spectral_every": ("batch_selection", ("spectral",)),
    "spectral_groups": ("batch_selection", ("spectral",)),
    "cpu_devices": ("strategy", ("mirrored", "multi_worker")),
}


def check_flag_combinations(program: str, run_flags) -> None:
    """Refuses a flag whose setting the run's other flags make void (e.g.
    `--spectral_every=3` with `--batch_selection=random`, `--cpu_devices=2` with
    `--strategy=default`), in one line naming both flags and the values under which
    it acts."""
    for flag, (governing, acting) in DEPENDENT_FLAGS.items():
        value = run_flags[flag].value
        if value != run_flags[flag].default and run_flags[governing].value not in acting:
            fail(program, f"--{flag}={value} has no effect with --{governing}="
                          f"{run_flags[governing].value}; it acts under --{governing}="
                          f"{'|'.join(acting)}: drop it, or pass one of those.")
    if run_flags.jit_compile and run_flags.strategy == "mirrored" and run_flags.cpu_devices >= 2:
        from emc2_tf.distribute import split_cpu_xla_reason

        fail(program, f"--jit_compile with --strategy=mirrored --cpu_devices="
                      f"{run_flags.cpu_devices}: {split_cpu_xla_reason('Drop --jit_compile')}.")
    check_finite_flags(program, run_flags)
    check_data_flags(program, run_flags)


def check_finite_flags(program: str, run_flags) -> None:
    """`--finite_augmentations` is 0 or K ≥ 2; `--gradient_error_every` needs it."""
    if run_flags.finite_augmentations not in (0,) and run_flags.finite_augmentations < 2:
        fail(program, f"--finite_augmentations must be 0 (off) or an integer ≥ 2 (K stored "
                      f"views per image); got {run_flags.finite_augmentations}.")
    if run_flags.gradient_error_every < 0:
        fail(program, f"--gradient_error_every must be ≥ 0 (0 = off); got "
                      f"{run_flags.gradient_error_every}.")
    if run_flags.gradient_error_every and not run_flags.finite_augmentations:
        fail(program, "--gradient_error_every needs --finite_augmentations=K (K ≥ 2): the exact "
                      "global loss and its gradient are computable over a finite set of views.")


def method_arguments(run_flags, data, views=None) -> dict:
    """The constructor options the run's method declares, filled from the flags and data.

    With `--finite_augmentations=K` a method that takes `finite_augmentations`
    gets K, and its image table (`images`) is the N·K stored views (`views`;
    None when the caller only evaluates or exports: no table then).
    """
    accepted = method_options(run_flags.method)
    arguments = {"seed": run_flags.seed}
    finite = run_flags.finite_augmentations
    if finite and "finite_augmentations" in accepted:
        arguments["finite_augmentations"] = finite
    if "images" in accepted:
        if not finite:
            arguments["images"] = image_table(data.train_images)  # uint8 when exact
        elif views is not None and "finite_augmentations" in accepted:
            arguments["images"] = views.table
    for flag, (option, convert) in METHOD_FLAGS.items():
        value = convert(run_flags[flag].value) if option in accepted else None
        if value is not None:
            arguments[option] = value
    return arguments


def model_name(run_flags) -> str:
    return run_flags.model_name or run_flags.method


def checkpoint_dir(run_flags) -> str:
    """The run's checkpoint folder ('' = checkpoints off)."""
    if run_flags.checkpoint_dir is None:
        return os.path.join("checkpoints", model_name(run_flags))
    return run_flags.checkpoint_dir


#: Data flags that act only on some kinds of `--dataset`: flag → the kinds
#: (`folder`, `tfds`). Given a non-default value for another kind, they would
#: change nothing: `check_data_flags` refuses them.
DATA_FLAGS = {
    "test_data_dir": ("folder",),
    "test_fraction": ("folder",),
    "skip_corrupt": ("folder",),
    "image_size": ("folder", "tfds"),
    "train_split": ("tfds",),
    "test_split": ("tfds",),
    "download": ("tfds",),
}


def dataset_kind(dataset: str) -> str:
    """`digits` | `fashion_mnist` | `folder` | `tfds` (any other name: a TFDS data set)."""
    return dataset if dataset in BUILTIN_DATASETS else "tfds"


def check_data_flags(program: str, run_flags) -> None:
    """Refuses data flags the `--dataset` does not use, `--test_fraction` beside
    `--test_data_dir`, and `--dataset=folder` without `--data_dir`, each in one
    line naming the flags."""
    kind = dataset_kind(run_flags.dataset)
    for flag, kinds in DATA_FLAGS.items():
        value = run_flags[flag].value
        if value != run_flags[flag].default and kind not in kinds:
            acting = " and ".join("a TFDS data set name" if k == "tfds" else f"--dataset={k}"
                                  for k in kinds)
            fail(program, f"--{flag}={value} has no effect with --dataset={run_flags.dataset}; "
                          f"it applies to {acting}.")
    if kind == "folder" and not run_flags.data_dir:
        fail(program, "--dataset=folder needs --data_dir=DIR: the folder of images (one "
                      "sub-folder per class, or a flat folder of unlabelled images).")
    if (run_flags.jit_compile and kind in ("folder", "tfds") and run_flags.method == "emc2"
            and (run_flags.out_of_batch == "reencode" or run_flags.exact_ratio)):
        fail(program, f"--jit_compile cannot re-encode stored negatives read from "
                      f"--dataset={run_flags.dataset} (files are read by index, outside XLA; "
                      f"--out_of_batch=reencode and --exact_ratio re-encode them): drop "
                      "--jit_compile, or use --out_of_batch=drop without --exact_ratio.")
    if run_flags.test_data_dir and run_flags.test_fraction != run_flags["test_fraction"].default:
        fail(program, f"--test_fraction={run_flags.test_fraction} has no effect with "
                      f"--test_data_dir={run_flags.test_data_dir} (the held-out images are that "
                      "folder's): drop one of them.")


def data_options(run_flags) -> dict:
    """`emc2_tf.load_dataset`'s options for the run's kind of `--dataset`."""
    options = {"folder": {"test_data_dir": run_flags.test_data_dir,
                          "test_fraction": run_flags.test_fraction,
                          "image_size": run_flags.image_size,
                          "skip_corrupt": run_flags.skip_corrupt},
               "tfds": {"train_split": run_flags.train_split,
                        "test_split": run_flags.test_split,
                        "download": run_flags.download,
                        "image_size": run_flags.image_size}}
    return options.get(dataset_kind(run_flags.dataset), {})


def load_data(program: str, dataset: str, data_dir: str | None, **options):
    """`emc2_tf.load_dataset(dataset, data_dir, **options)`; a bad data set or
    file is one line naming `--dataset`; skipped or ignored files, and folders
    read as grey, are reported (one line each, on stderr)."""
    import emc2_tf

    try:
        data = emc2_tf.load_dataset(dataset, data_dir, **options)
    except (FileNotFoundError, ValueError) as error:
        fail(program, f"--dataset={dataset}: {error}")
    for line in source_notes(data):
        print(f"{program}: {line}", file=sys.stderr)
    return data


def source_notes(data) -> list[str]:
    """The notes of the image folders behind `data`'s splits (files skipped or
    ignored, images read as grey: `ImageFolderSource.notes`), each once."""
    lines = []
    for images in (data.train_images, data.test_images):
        for line in getattr(base_source(images), "notes", lambda: [])():
            if line not in lines:
                lines.append(line)
    return lines


def load_run_data(program: str, run_flags):
    """The run's data set: `--dataset` with its data flags, then the
    `--train_size` subset (stratified, `--seed`)."""
    import emc2_tf

    data = load_data(program, run_flags.dataset, run_flags.data_dir, **data_options(run_flags))
    try:
        return emc2_tf.subset_train(data, run_flags.train_size, seed=run_flags.seed)
    except ValueError as error:
        fail(program, f"--train_size={run_flags.train_size}: {error}")


def base_source(images):
    """The images behind a `SubsetSource` (a held-out share, a `--train_size`
    subset), however deeply nested; anything else as it is."""
    while isinstance(images, SubsetSource):
        images = images.source
    return images


def data_fingerprint(data) -> str:
    """The identity of the training images the chain state is indexed by: the
    source's fingerprint (a folder: N and every path with its size; an array:
    N, shape and dtype)."""
    from emc2_tf.data.image_source import as_source

    return as_source(data.train_images, "train_images").fingerprint()


def check_warmup(program: str, run_flags) -> None:
    """Refuses `--warmup_epochs` ≥ `--epochs` (the cosine decay needs ≥ 1 epoch)."""
    if run_flags.warmup_epochs and run_flags.warmup_epochs >= run_flags.epochs:
        fail(program, f"--warmup_epochs={run_flags.warmup_epochs} must be < "
                      f"--epochs={run_flags.epochs} (the cosine decay needs ≥ 1 epoch).")


def run_optimizer(program: str, run_flags, num_train: int):
    """The optimizer of `--optimizer`, `--learning_rate`, `--weight_decay` and
    `--warmup_epochs` (> 0: warm-up then cosine decay over the run's
    `--epochs` × ⌊N / B⌋ steps; 0: constant learning rate)."""
    import emc2_tf

    check_warmup(program, run_flags)
    try:
        learning_rate = emc2_tf.epoch_learning_rate(
            run_flags.learning_rate, run_flags.epochs, num_train // run_flags.batch_size,
            run_flags.warmup_epochs)
    except ValueError as error:
        fail(program, f"--warmup_epochs={run_flags.warmup_epochs}: {error}")
    try:
        return emc2_tf.build_optimizer(run_flags.optimizer, learning_rate, run_flags.weight_decay)
    except ValueError as error:
        fail(program, f"--optimizer={run_flags.optimizer}: {error}")


@dataclass
class Run:
    """A run's pieces, built from its training flags."""

    data: Any
    encoder: Any
    encoder_name: str
    model: Any
    views: Any = None  # the stored views of --finite_augmentations (train only)


def build_run(program: str, run_flags, strategy=None, data=None, views=None) -> Run:
    """Builds the data set (with `--train_size`), encoder and compiled model
    (with the `--optimizer` and schedule) the flags describe.

    Weights are freshly initialised (seeded); restore a checkpoint into
    `run.model` for trained ones.
    """
    import keras
    import tensorflow as tf

    import emc2_tf

    strategy = strategy or tf.distribute.get_strategy()
    if data is None:
        data = load_run_data(program, run_flags)
    encoder_name = run_flags.encoder
    if encoder_name == "auto":
        encoder_name = emc2_tf.encoders.default_encoder_name(data.image_shape)
    keras.utils.set_random_seed(run_flags.seed)
    with strategy.scope():
        encoder = emc2_tf.build_encoder(encoder_name, data.image_shape)
        try:
            model = emc2_tf.build_model(
                run_flags.method, encoder=encoder, dataset_size=data.num_train,
                **method_arguments(run_flags, data, views),
            )
        except ValueError as error:
            fail(program, str(error))
        model.compile(optimizer=run_optimizer(program, run_flags, data.num_train),
                      jit_compile=run_flags.jit_compile)
    return Run(data=data, encoder=encoder, encoder_name=encoder_name, model=model, views=views)


def define_checkpoint_flags() -> None:
    """`--checkpoint_dir` and `--checkpoint`: which trained run `evaluate`/`export` read."""
    from absl import flags

    flags.DEFINE_string("checkpoint_dir", None,
                        "A training run's checkpoint folder (holds flags.txt).")
    flags.DEFINE_string("checkpoint", None,
                        "A checkpoint prefix in --checkpoint_dir (e.g. .../ckpt-440); default "
                        "the latest.")


def load_trained_run(program: str, directory: str, checkpoint: str | None):
    """Reads a run's flags.txt, builds its model and restores a checkpoint into it.

    Returns `(run_flags, run, checkpoint_path)`; every failure is one line.
    """
    from trainers.run_flags import read_flags_file

    try:
        run_flags = read_flags_file(directory)
    except (FileNotFoundError, ValueError) as error:
        fail(program, f"--checkpoint_dir={directory}: {error}")
    run = build_run(program, run_flags)
    return run_flags, run, restore_trained(program, run, directory, checkpoint)


def restore_trained(program: str, run: Run, directory: str, checkpoint: str | None) -> str:
    """Restores a run's checkpoint (the latest, or `checkpoint`) into `run.model`; returns its
    path. A checkpoint whose encoder holds NaN or inf is refused in one line.

    The latest is `emc2_tf.latest_checkpoint`: the newest complete checkpoint on
    disk, when the state file names it. A state file that is missing, damaged or
    disagrees is one line naming the checkpoints on disk and `--checkpoint=` to
    choose one (before: "holds no checkpoint yet" beside ckpt-* files).
    """
    import shlex

    import emc2_tf
    from emc2_tf.safety import check_finite_variables

    saver = emc2_tf.TrainingCheckpoint(
        directory, run.model, steps_per_epoch=1, handle_signals=False)
    try:
        path = saver.restore(checkpoint, check_steps_per_epoch=False)
    except emc2_tf.CheckpointStateError as error:  # issue 19: the state file is only a hint
        choose = (f"choose one with {shlex.quote('--checkpoint=' + error.on_disk[-1])} (the "
                  "newest complete one) or another ckpt-N on disk" if error.on_disk
                  else "there is nothing to load")
        fail(program, f"--checkpoint_dir={directory}: {error.summary}; {choose}.")
    except emc2_tf.CheckpointError as error:
        fail(program, str(error))
    if path is None:
        fail(program, f"--checkpoint_dir={directory} holds no checkpoint yet (train writes one "
                      "at each epoch end).")
    try:  # issue 13: never evaluate or serve NaN or inf weights
        check_finite_variables(run.encoder.weights, "refusing the encoder")
    except emc2_tf.NonFiniteError as error:
        others = [os.path.basename(p) for p in emc2_tf.list_checkpoints(directory) if p != path]
        hint = (f" Earlier checkpoints: {', '.join(others)} (choose one with --checkpoint=)."
                if others else "")
        fail(program, f"checkpoint {path} holds non-finite weights: {error} Nothing was "
                      f"written.{hint}")
    return path
