"""The training flags, and the flags file saved next to a run's checkpoints.

`define_train_flags(flag_values)` defines every flag of `trainers.train` on
any `absl.flags.FlagValues`: on the global `FLAGS` for the trainer, and on
a private instance when `evaluate`, `export` or `train --resume` read a
run's `flags.txt` back with the same parsers and validators.

`<checkpoint_dir>/flags.txt` is a flag file: `python -m trainers.train
--flagfile=checkpoints/emc2/flags.txt` repeats the run.
"""

from __future__ import annotations

import os
import tempfile

from absl import flags

from emc2_tf.batch_selection import BATCH_SELECTIONS
from emc2_tf.checks import finite_number
from emc2_tf.distribute import STRATEGIES
from emc2_tf.models import METHODS
from emc2_tf.optimizers import OPTIMIZERS

FLAGS_FILE = "flags.txt"

#: Flags that define what a run computes: `--resume` takes them from the
#: run's flags file and refuses a different value.
RUN_DEFINING = (
    "method", "dataset", "data_dir", "batch_size", "temperature", "learning_rate", "seed",
    "encoder", "burn_in", "exact_ratio", "out_of_batch", "waste_recycling", "gamma", "kcl_t",
    "kcl_gamma", "cache_refresh", "cache_negatives", "batch_selection", "spectral_every",
    "spectral_groups", "model_name", "optimizer", "weight_decay", "warmup_epochs", "train_size",
    "test_fraction", "image_size", "skip_corrupt", "train_split",
)


def define_train_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the flags of `trainers.train` (with their validators) on `flag_values`."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_enum("method", "emc2", sorted(METHODS), "Contrastive method.", **fv)
    flags.DEFINE_string(
        "dataset", "digits",
        "digits (inside scikit-learn) | fashion_mnist (idx files, Debian's "
        "dataset-fashion-mnist) | folder (a folder of images, --data_dir) | the name of a "
        "TFDS data set (e.g. stl10), read by index from ArrayRecord files in --data_dir.", **fv)
    flags.DEFINE_string(
        "data_dir", None,
        "fashion_mnist: folder of the idx files (default /usr/share/datasets/fashion-mnist); "
        "folder: the image folder (one sub-folder per class, or a flat folder: unlabelled); "
        "TFDS data sets: the TFDS data_dir (default TFDS' own). Downloads only with "
        "--download.", **fv)
    flags.DEFINE_string(
        "test_data_dir", None,
        "folder only: a separate folder of held-out images (read at the training images' "
        "size). Default: a labelled folder holds out --test_fraction of its images; an "
        "unlabelled one trains without evaluation.", **fv)
    flags.DEFINE_float(
        "test_fraction", 0.1,
        "folder only, without --test_data_dir: the share of a labelled folder's images held "
        "out for evaluation, stratified by class; the same images on every run and seed.",
        **fv)
    flags.DEFINE_integer(
        "image_size", None,
        "folder and TFDS: resize every image to this many pixels square (default: the first "
        "image's size; images of other sizes are resized to it).", **fv)
    flags.DEFINE_bool(
        "skip_corrupt", False,
        "folder only: leave out unreadable or corrupt image files (reported with their "
        "count) instead of refusing the folder.", **fv)
    flags.DEFINE_string(
        "train_split", "train",
        "TFDS only: the split expression trained on, e.g. train+unlabelled (STL-10 as in "
        "the paper) or train[:90%].", **fv)
    flags.DEFINE_string(
        "test_split", "test",
        "TFDS only: the held-out split expression for evaluation ('' = none).", **fv)
    flags.DEFINE_bool(
        "download", False,
        "TFDS only: let TFDS download and prepare the data set (as ArrayRecord) in "
        "--data_dir when it is not there. Without it nothing is downloaded.", **fv)
    flags.DEFINE_integer("epochs", 30, "Training epochs (in all, also when resuming).", **fv)
    flags.DEFINE_integer("batch_size", 64, "Images per batch B (2B views).", **fv)
    flags.DEFINE_float(
        "temperature", None,
        "Temperature τ > 0 (β = 1/τ); default: the method's own (emc2 0.07, sogclr 0.1, "
        "simclr 0.1, dcl 0.1, dhel 0.3, cache 0.07). kcl has no temperature (its kernel's "
        "scale is --kcl_t): refused there.", **fv)
    flags.DEFINE_float("learning_rate", 1e-3,
                       "Learning rate (the peak of the schedule when --warmup_epochs > 0).", **fv)
    flags.DEFINE_enum("optimizer", "adam", list(OPTIMIZERS),
                      "adam | adamw (decoupled weight decay) | sgd (momentum 0.9) | lars "
                      "(momentum 0.9, trust coefficient 0.001; SimCLR's LARS).", **fv)
    flags.DEFINE_float("weight_decay", 0.0,
                       "Weight decay ≥ 0: an L2 term added to the gradient for adam, sgd and "
                       "lars (lars: kernels only), as the authors' PyTorch code; decoupled for "
                       "adamw.", **fv)
    flags.DEFINE_integer("warmup_epochs", 0,
                         "> 0: linear warm-up from 0 over this many epochs, then cosine decay "
                         "to 0 at --epochs; 0: constant --learning_rate.", **fv)
    flags.DEFINE_integer("train_size", 0,
                         "Train on a subset of this many training images, stratified by label "
                         "and drawn with --seed (0 = all); the held-out split is unchanged.",
                         **fv)
    flags.DEFINE_integer("seed", 0,
                         "Seed of weights, data order, augmentations and MH draws.", **fv)
    flags.DEFINE_enum("encoder", "auto", ["auto", "small_cnn", "resnet18"],
                      "Encoder; auto = small_cnn up to 28 px, resnet18 above.", **fv)
    flags.DEFINE_integer("burn_in", -1,
                         "emc2 only: MH burn-in steps per pass; -1 = B − 1 (paper).", **fv)
    flags.DEFINE_bool("exact_ratio", False,
                      "emc2 only: refresh the current state's score before each pass "
                      "(recommended when N/B is large: README, Results).", **fv)
    flags.DEFINE_enum("out_of_batch", "drop", ["reencode", "drop"],
                      "emc2 only: what a recorded MH step still on the chain's out-of-batch "
                      "negative adds: reencode = that negative re-encoded now, with gradient "
                      "(the paper's algorithm); drop = nothing, still counted in the normaliser "
                      "(the official main_mcmc estimator; needs no re-encoding; the default, chosen on "
                      "Fashion-MNIST: README, Results).", **fv)
    flags.DEFINE_bool("waste_recycling", True,
                      "emc2 only: each recorded MH step adds α·f(candidate) + (1 − α)·f(current) "
                      "instead of f(next state): same expectation, lower variance (default on; "
                      "--nowaste_recycling for the paper's average).", **fv)
    flags.DEFINE_enum("scan", "auto", ["auto", "sequential", "parallel", "blocked"],
                      "emc2 only: how the MH scan runs (identical results): sequential = 2B "
                      "dependent steps per pass; parallel = pointer doubling, O(log B) rounds, "
                      "O(B^3) work; blocked = blocks of 16 candidates in order, each by pointer "
                      "doubling, O(B·16²) memory; auto = parallel while B(2B+1)2B ≤ 2^26 on a "
                      "GPU, ≤ 2^18 (B ≤ 40) on a CPU, else sequential (measured: "
                      "benchmarks/scan.py).",
                      **fv)
    flags.DEFINE_integer("finite_augmentations", 0,
                         "K ≥ 2: the EMC² paper's finite-augmentation setting: K views of every "
                         "image drawn once (seeded) and stored as uint8, each step's two views "
                         "two distinct stored ones; 0 = fresh augmentations every step.", **fv)
    flags.DEFINE_integer("gradient_error_every", 0,
                         "With --finite_augmentations: every n steps, log the global loss F over "
                         "all N·K views, ‖∇F‖² and the step's gradient error ‖g − ∇F‖² "
                         "(TensorBoard global/*, and the summary); one device only; 0 = off.",
                         **fv)
    flags.DEFINE_float("gamma", 0.9,
                       "sogclr only: moving-average rate γ of u, in (0, 1] (paper 0.9).", **fv)
    flags.DEFINE_float("kcl_t", 2.0,
                       "kcl only: the Gaussian kernel's t in exp(−t‖x − y‖²), > 0 (authors 2).",
                       **fv)
    flags.DEFINE_float("kcl_gamma", 16.0,
                       "kcl only: weight γ of the energy (uniformity) term, > 0 (authors 16).",
                       **fv)
    flags.DEFINE_float("cache_refresh", 0.1,
                       "cache only: share ρ in [0, 1] of the cache rows re-encoded with the "
                       "updated encoder after each step, the stalest first (paper 0.1).", **fv)
    flags.DEFINE_integer("cache_negatives", 1,
                         "cache only: negatives M ≥ 1 drawn per anchor from the cache by "
                         "Gumbel-max without replacement, re-encoded with gradient (paper 1).",
                         **fv)
    flags.DEFINE_enum("batch_selection", "random", list(BATCH_SELECTIONS),
                      "random: uniform shuffling; spectral: spectral-clustering batches "
                      "(Cho et al.), any method.", **fv)
    flags.DEFINE_integer("spectral_every", 1,
                         "spectral only: re-select the batches every k epochs.", **fv)
    flags.DEFINE_integer("spectral_groups", 40,
                         "spectral only: batches per clustered group (authors: 40).", **fv)
    flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.", **fv)
    flags.DEFINE_enum("strategy", "default", list(STRATEGIES),
                      "default: one device; mirrored: every local GPU (or --cpu_devices logical "
                      "CPUs); multi_worker: MultiWorkerMirroredStrategy over TF_CONFIG's "
                      "workers. --batch_size is the global batch, split over the replicas.", **fv)
    flags.DEFINE_integer("cpu_devices", 0,
                         "Split the CPU into this many logical devices (0 = no split): runs "
                         "--strategy=mirrored with several replicas on a machine without GPUs.",
                         **fv)
    flags.DEFINE_float("worker_timeout", 120.0,
                       "multi_worker: seconds to wait for the other workers, and the timeout of "
                       "each collective operation.", **fv)
    flags.DEFINE_integer("eval_every", 10,
                         "Log held-out 1-NN accuracy every N epochs (0 = off).", **fv)
    flags.DEFINE_string("model_name", None,
                        "The run's name: checkpoints, TensorBoard and export folders; "
                        "default = --method.", **fv)
    flags.DEFINE_string("checkpoint_dir", None,
                        "The run's checkpoints and flags.txt; default checkpoints/<model_name>; "
                        "empty = no checkpoints.", **fv)
    flags.DEFINE_integer("checkpoint_every_steps", 0,
                         "Also checkpoint every N training steps (0 = at each epoch end, at the "
                         "end and on SIGTERM/SIGINT only).", **fv)
    flags.DEFINE_integer("keep_checkpoints", 3, "How many recent checkpoints to keep.", **fv)
    flags.DEFINE_bool("resume", False,
                      "Continue the run in --checkpoint_dir from its latest checkpoint (its "
                      "flags.txt supplies the flags not given).", **fv)
    flags.DEFINE_string("resume_from", None,
                        "Continue from this checkpoint prefix (e.g. checkpoints/emc2/ckpt-440) "
                        "instead of the latest; implies --resume.", **fv)
    flags.DEFINE_bool("overwrite", False,
                      "Start afresh even if --checkpoint_dir holds checkpoints of an earlier "
                      "run or --model_name is an earlier run's: its checkpoints and its "
                      "TensorBoard folder <tensorboard_dir>/<model_name> are deleted; its "
                      "exports are kept (this run exports the next version).", **fv)
    flags.DEFINE_string("tensorboard_dir", "runs",
                        "TensorBoard logs go to <tensorboard_dir>/<model_name>; empty = off.", **fv)
    flags.DEFINE_integer("log_every_steps", 0,
                         "Also write TensorBoard scalars every N steps (0 = per epoch only).",
                         **fv)
    flags.DEFINE_bool("projector", False,
                      "After training, write the held-out embeddings and labels for "
                      "TensorBoard's projector.", **fv)
    flags.DEFINE_string("export_dir", "savedmodels", "Export root (TF Serving layout).", **fv)
    flags.DEFINE_bool("export", True, "Export the trained encoder.", **fv)

    # Every float flag must be a finite number (issue 13: --temperature=inf or
    # --worker_timeout=inf were accepted), checked by emc2_tf.checks.finite_number.
    validators = {
        "temperature": (lambda v: v is None or _finite(v),
                        "--temperature must be > 0 and finite (e.g. 0.07)."),
        "gamma": (lambda v: 0 < v <= 1, "--gamma must be in (0, 1] (e.g. 0.9)."),
        "kcl_t": (_finite, "--kcl_t must be finite and > 0 (e.g. 2)."),
        "kcl_gamma": (_finite, "--kcl_gamma must be finite and > 0 (e.g. 16)."),
        "cache_refresh": (lambda v: 0 <= v <= 1,
                          "--cache_refresh must be a finite number in [0, 1] (e.g. 0.1)."),
        "cache_negatives": (lambda v: v >= 1, "--cache_negatives must be ≥ 1 (e.g. 1)."),
        "spectral_every": (lambda v: v >= 1, "--spectral_every must be ≥ 1."),
        "spectral_groups": (lambda v: v >= 1, "--spectral_groups must be ≥ 1."),
        "batch_size": (lambda v: v >= 2, "--batch_size must be ≥ 2."),
        "epochs": (lambda v: v >= 1, "--epochs must be ≥ 1."),
        "learning_rate": (_finite, "--learning_rate must be finite and > 0 (e.g. 1e-3)."),
        "weight_decay": (lambda v: _finite(v, strictly_positive=False),
                         "--weight_decay must be finite and ≥ 0 (e.g. 1e-4)."),
        "warmup_epochs": (lambda v: v >= 0, "--warmup_epochs must be ≥ 0 (0 = no warm-up)."),
        "image_size": (lambda v: v is None or v > 0,
                       "--image_size must be a positive number of pixels (e.g. 96), or left "
                       "out (the first image's size)."),
        "test_fraction": (lambda v: 0 < v < 1,
                          "--test_fraction must be in (0, 1) (e.g. 0.1)."),
        "train_size": (lambda v: v >= 0, "--train_size must be ≥ 0 (0 = every training image)."),
        "burn_in": (lambda v: v >= -1, "--burn_in must be -1 (B − 1) or ≥ 0."),
        "cpu_devices": (lambda v: v >= 0, "--cpu_devices must be ≥ 0."),
        "worker_timeout": (_finite, "--worker_timeout must be > 0 and finite (seconds, e.g. "
                                    "120)."),
        "eval_every": (lambda v: v >= 0, "--eval_every must be ≥ 0."),
        "checkpoint_every_steps": (lambda v: v >= 0, "--checkpoint_every_steps must be ≥ 0."),
        "keep_checkpoints": (lambda v: v >= 1, "--keep_checkpoints must be ≥ 1."),
        "log_every_steps": (lambda v: v >= 0, "--log_every_steps must be ≥ 0."),
        "model_name": (lambda v: v is None or (v and "/" not in v and not v.startswith(".")),
                       "--model_name must be a plain folder name (no '/', not hidden)."),
    }
    for name, (check, message) in validators.items():
        flags.register_validator(name, check, message, **fv)


def _finite(value, strictly_positive: bool = True) -> bool:
    """Whether `value` is a finite number > 0 (or ≥ 0): `emc2_tf.checks.finite_number`."""
    try:
        finite_number(value, "value", strictly_positive)
    except ValueError:
        return False
    return True


def flags_file_text(flag_values: flags.FlagValues, names) -> str:
    """The flag file holding `names`' current values (flags set to None are left out)."""
    lines = []
    for name in names:
        serialized = flag_values[name].serialize()
        if serialized:
            lines.append(serialized)
    return "\n".join(lines) + "\n"


def write_text_file(directory: str, name: str, text: str) -> str:
    """Writes `<directory>/<name>` atomically (temporary file + rename): a crash or
    a full disk leaves the old file or the new one, never half of one."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    handle, staging = tempfile.mkstemp(prefix=f".{name}-", dir=directory)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except BaseException:  # e.g. a full disk: leave no half-written staging file
        if os.path.exists(staging):
            os.remove(staging)
        raise
    return path


def write_flags_file(directory: str, text: str) -> str:
    """Writes `<directory>/flags.txt` atomically (`write_text_file`)."""
    return write_text_file(directory, FLAGS_FILE, text)


def read_flags_file(directory: str) -> flags.FlagValues:
    """A run's saved training flags, parsed and validated like the trainer's.

    Raises `FileNotFoundError` or `ValueError` with a one-line reason.
    """
    path = os.path.join(directory, FLAGS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: not a training run's checkpoint folder (train writes "
            "flags.txt there when it starts)."
        )
    saved = flags.FlagValues()
    define_train_flags(saved)
    try:
        saved(["saved-run", f"--flagfile={path}"])
    except flags.Error as error:
        raise ValueError(f"{path} cannot be parsed: {error}") from None
    return saved
