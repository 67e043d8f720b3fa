r"""Pre-train an encoder with a contrastive method, evaluate it, export it.

    python -m trainers.train --method=emc2 --dataset=digits --epochs=30
    python -m trainers.train --resume            # after a crash or preemption
    python -m trainers.train --flagfile=checkpoints/emc2/flags.txt --model_name=emc2-repeat
                                                 # the same run again, under its own name

Steps: load the data set (no download), build the two-view pipeline and the
encoder, `model.fit` with a progress bar, checkpoints in `--checkpoint_dir`
(every epoch, every `--checkpoint_every_steps`, and on SIGTERM/SIGINT) and
TensorBoard scalars under `--tensorboard_dir`; report the held-out 1-NN and
linear-probe accuracy; export the encoder to
`<export_dir>/<model_name>/<version>/` for TF Serving. `--helpfull` lists
every flag.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from trainers.common import (  # noqa: E402  (light: no TensorFlow imported yet)
    base_source,
    build_run,
    check_flag_combinations,
    check_method_flags,
    check_output_dirs,
    check_warmup,
    checkpoint_dir,
    data_fingerprint,
    fail as _fail,
    load_run_data,
    model_name,
)
from trainers.run_flags import (  # noqa: E402
    FLAGS_FILE,
    RUN_DEFINING,
    define_train_flags,
    flags_file_text,
    read_flags_file,
    write_flags_file,
    write_text_file,
)

FLAGS = flags.FLAGS
define_train_flags(FLAGS)
PROGRAM = "train"

#: Flags of one invocation, not of the run: left out of flags.txt. Also
#: --checkpoint_dir: `--resume` names the folder itself, and a repeat of the run
#: (`--flagfile=<run>/flags.txt`) must not write into the original's folder; with
#: the recorded --tensorboard_dir/--export_dir it then gets its own name or is
#: refused (see `check_name_is_free`, issue 13).
INVOCATION_ONLY = ("resume", "resume_from", "overwrite", "checkpoint_dir")


def fail(message: str):
    _fail(PROGRAM, message)


def run_flag_names() -> list[str]:
    """The training flags flags.txt records (not another method's options)."""
    from emc2_tf.models import method_options

    from trainers.common import METHOD_FLAGS

    accepted = method_options(FLAGS.method)
    module_flags = FLAGS.flags_by_module_dict().get("trainers.run_flags", [])
    return sorted(
        f.name for f in module_flags
        if f.name not in INVOCATION_ONLY
        and not (f.name in METHOD_FLAGS and METHOD_FLAGS[f.name][0] not in accepted)
    )


def take_saved_flags(directory: str) -> None:
    """`--resume`: the run's flags.txt supplies every flag not given (a run-defining
    flag that is given must equal the recorded one)."""
    try:
        saved = read_flags_file(directory)
    except (FileNotFoundError, ValueError) as error:
        fail(f"--resume: nothing to resume in --checkpoint_dir={directory}: {error}")
    for name in RUN_DEFINING:
        if FLAGS[name].present:
            if FLAGS[name].value != saved[name].value:
                fail(f"--resume: --{name}={FLAGS[name].value} differs from the run's "
                     f"--{name}={saved[name].value} ({os.path.join(directory, FLAGS_FILE)}); "
                     f"drop --{name} to continue that run.")
        else:
            FLAGS[name].value = saved[name].value
    # Every other flag the file records (--epochs, --export, --projector, --jit_compile, ...)
    # keeps its recorded value unless given again; not --checkpoint_dir (the folder resumed).
    for name in saved:
        if (saved[name].present and name not in RUN_DEFINING + INVOCATION_ONLY
                and name != "checkpoint_dir" and name in FLAGS and not FLAGS[name].present):
            FLAGS[name].value = saved[name].value


def command(program: str, *args: str) -> str:
    """`python -m trainers.<program> ARGS`, shell-quoted (a folder may hold spaces)."""
    return shlex.join(["python", "-m", f"trainers.{program}", *args])


def lock_checkpoint_dir(directory: str) -> None:
    """Makes this process the one writer of `--checkpoint_dir`, before anything is
    written into it (issue 19: two trainers on one folder interleaved their
    checkpoints). The lock is held until the process exits; the kernel releases it
    when the process dies, so a killed run's leftover lock file never blocks its
    resume. Also removes the `ckpt-<step>_temp` folders a killed save left."""
    from emc2_tf.run_lock import FolderInUseError, lock_run_folder

    try:
        lock_run_folder(directory)
    except FolderInUseError as error:
        fail(f"--checkpoint_dir={error}; nothing was written. Stop that run first (SIGTERM "
             "saves a checkpoint and exits) and continue it with --resume, or choose another "
             "--checkpoint_dir.")
    except OSError as error:
        fail(f"--checkpoint_dir={directory}: cannot lock it for this run "
             f"({error.strerror or error}).")


def check_folder_is_free(directory: str) -> None:
    """A new run (no --resume, no --overwrite) must not write into an earlier run's
    checkpoints: found from the `ckpt-<step>.*` files, whatever the state file says
    (issue 19: a damaged state file let a new run overwrite them)."""
    import emc2_tf
    from emc2_tf.checkpoint import checkpoint_summary

    found = checkpoint_summary(directory)
    if not found:
        return
    continue_it = "pass --resume to continue it"
    try:
        emc2_tf.latest_checkpoint(directory)
    except emc2_tf.CheckpointStateError as error:
        continue_it = (f"pass {shlex.quote('--resume_from=' + error.on_disk[-1])} to continue "
                       "it from the newest complete one (--resume refuses a state file that "
                       "disagrees with the files)" if error.on_disk else "nothing can resume it")
    fail(f"--checkpoint_dir={directory} holds checkpoints of an earlier run ({found}); "
         f"{continue_it}, --overwrite to delete them and start afresh, or choose another "
         "--checkpoint_dir/--model_name.")


#: `<checkpoint_dir>/data.txt`: the identity of the training images (`N=`,
#: `fingerprint=`, `name=`), written when the run starts; `--resume` refuses
#: other images, since the chain state is indexed by sample.
DATA_FILE = "data.txt"


def data_record(data) -> dict:
    """`data.txt`'s fields: the data set's name, its number of images as found
    (`images`: a folder's files, before any held-out share or `--train_size`
    subset), the N trained on and the training images' fingerprint."""
    return {"name": data.name, "images": str(len(base_source(data.train_images))), "N": str(data.num_train),
            "fingerprint": data_fingerprint(data)}


def check_same_data(directory: str, data) -> None:
    """`--resume`: refuses training images other than the run's (`data.txt`): a
    folder with files added, removed, renamed or rewritten, another split, another
    `--train_size` subset. A run from before `data.txt` existed is not checked."""
    path = os.path.join(directory, DATA_FILE)
    try:
        with open(path) as stream:
            recorded = dict(line.split("=", 1) for line in stream.read().splitlines()
                            if "=" in line)
    except FileNotFoundError:
        return
    now = data_record(data)
    if recorded.get("fingerprint") == now["fingerprint"]:
        return
    change = next((f"{key}={recorded.get(key)} then, {key}={now[key]} now"
                   for key in ("images", "N") if recorded.get(key) != now[key]),
                  f"the same N={now['N']}, but other files or sizes")
    fail(f"--resume: the training images of {data.name} are not the run's ({change}; "
         f"fingerprint {now['fingerprint']} vs {recorded.get('fingerprint')} in {path}): "
         "the chain state is indexed by sample, so the run cannot continue on other "
         "images. Restore the images as they were, or start afresh with --overwrite.")


def write_data_file(directory: str, data) -> None:
    write_text_file(directory, DATA_FILE,
                    "".join(f"{key}={value}\n" for key, value in data_record(data).items()))


def remove_checkpoints(directory: str) -> None:
    """`--overwrite`: deletes the earlier run's checkpoint files (every `ckpt-<step>.*`,
    found from the files, whatever the state file lists), its state file and
    TensorFlow's temporary files, the workers' `.worker-N` folders and flags.txt;
    nothing else (not the lock this process holds)."""
    from emc2_tf.checkpoint import STATE_FILE, checkpoint_files

    if not os.path.isdir(directory):
        return
    for name in checkpoint_files(directory):
        os.remove(os.path.join(directory, name))
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if (name in (STATE_FILE, FLAGS_FILE, DATA_FILE) or name.startswith(STATE_FILE + ".tmp")
                or name.startswith(".worker-")):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def restore_to_resume(checkpoint, directory: str) -> str | None:
    """`--resume`/`--resume_from`: restores the run's checkpoint; returns its path (None:
    no checkpoint yet). A state file that is missing, damaged or disagrees with the
    checkpoint files stops plain `--resume` in one line naming what is on disk and the
    `--resume_from` that continues from the newest; nothing is written."""
    import emc2_tf

    try:
        return checkpoint.restore(FLAGS.resume_from)
    except emc2_tf.CheckpointStateError as error:
        newest = error.on_disk[-1] if error.on_disk else None
        way_out = (f"continue from {os.path.basename(newest)} with "
                   f"{shlex.quote('--resume_from=' + newest)} (or another ckpt-N on disk), or "
                   if newest else "")
        fail(f"--resume: in --checkpoint_dir={directory}: {error.summary}. --resume continues "
             "from the newest complete checkpoint only when the state file names it: "
             f"{way_out}start afresh with --overwrite (deletes them). Nothing was written.")
    except emc2_tf.CheckpointError as error:
        fail(f"--resume: {error}")


def check_name_is_free(name: str, tensorboard_dir: str | None) -> None:
    """A new run (no --resume, no --overwrite) must not take an earlier run's name.

    Otherwise it would write its TensorBoard logs into the earlier run's
    `<tensorboard_dir>/<name>` and publish itself as the newest served version
    of `<export_dir>/<name>`: what a repeat with `--flagfile=<run>/flags.txt`
    did (issue 13). The fix: give the repeat its own `--model_name`.
    """
    from emc2_tf.export import existing_versions

    taken = []
    if tensorboard_dir and os.path.isdir(tensorboard_dir) and os.listdir(tensorboard_dir):
        taken.append(f"{tensorboard_dir} holds its TensorBoard logs")
    versions = existing_versions(os.path.join(FLAGS.export_dir, name)) if FLAGS.export else []
    if versions:
        taken.append(f"{os.path.join(FLAGS.export_dir, name)} serves its version {versions[-1]} "
                     f"(this run would publish itself as version {versions[-1] + 1})")
    if taken:
        fail(f"--model_name={name} is the name of an earlier run: {'; '.join(taken)}. Give this "
             f"run its own --model_name (e.g. --model_name={name}-2; a --flagfile repeat of a "
             "run needs one), or pass --overwrite to replace that run.")


def state_digest(model) -> str:
    """A SHA-256 of the model's weights and per-sample state (to compare runs and workers)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight)).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class RunPlan:
    """Where a run writes, decided from the flags before anything is loaded."""

    directory: str  # --checkpoint_dir ('' = checkpoints off)
    name: str  # --model_name
    tensorboard_dir: str | None
    resume: bool
    chief: bool  # the one worker that writes TensorBoard logs, flags.txt and exports


def start_strategy():
    """`--cpu_devices` and `--strategy`; refuses a global batch the replicas do not divide."""
    import emc2_tf

    if FLAGS.cpu_devices:
        try:
            emc2_tf.split_cpu(FLAGS.cpu_devices)
        except (RuntimeError, ValueError) as error:
            fail(f"--cpu_devices={FLAGS.cpu_devices}: {error}")
    try:
        strategy = emc2_tf.make_strategy(FLAGS.strategy, worker_timeout=FLAGS.worker_timeout,
                                         program=PROGRAM)
    except ValueError as error:
        fail(f"--strategy={FLAGS.strategy}: {error}")
    replicas = strategy.num_replicas_in_sync
    if FLAGS.batch_size % replicas:
        fail(f"--batch_size={FLAGS.batch_size} (the global batch) is not divisible by the "
             f"{replicas} replicas of --strategy={FLAGS.strategy}; use a multiple of {replicas}.")
    return strategy


def plan_outputs(strategy) -> RunPlan:
    """The run's output folders, each checked writable before any data is loaded or
    anything built (issue 13; the chief alone writes TensorBoard logs and exports)."""
    import emc2_tf

    directory = checkpoint_dir(FLAGS)
    resume = FLAGS.resume or FLAGS.resume_from is not None
    chief = emc2_tf.is_chief(strategy)
    name = model_name(FLAGS)
    tensorboard_dir = os.path.join(FLAGS.tensorboard_dir, name) if FLAGS.tensorboard_dir else None
    outputs = [("checkpoint_dir", directory, directory)] if directory else []
    if tensorboard_dir and chief:
        outputs.append(("tensorboard_dir", FLAGS.tensorboard_dir, tensorboard_dir))
    if FLAGS.export and chief:
        outputs.append(("export_dir", FLAGS.export_dir, os.path.join(FLAGS.export_dir, name)))
    check_output_dirs(PROGRAM, outputs)
    return RunPlan(directory, name, tensorboard_dir, resume, chief)


def claim_outputs(plan: RunPlan) -> None:
    """After the flags, the strategy and the data are known to be valid (their errors
    come first), before anything is built or written: the run's name must be free,
    and this process becomes the one writer of --checkpoint_dir.

    The lock (it creates the folder) comes after every refusal that does not depend on
    the folder's contents; the contents are judged under it. Only the chief writes
    --checkpoint_dir (the other workers write .worker-N in it).
    """
    if not plan.resume and not FLAGS.overwrite and plan.chief:
        check_name_is_free(plan.name, plan.tensorboard_dir)
    if plan.directory and plan.chief:
        lock_checkpoint_dir(plan.directory)
    if plan.directory and not plan.resume and not FLAGS.overwrite:
        check_folder_is_free(plan.directory)


def epoch_timer(epoch_seconds: list):
    """A callback appending each epoch's wall time to `epoch_seconds`."""
    import keras

    return keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epoch_seconds.append(-time.time()),
        on_epoch_end=lambda epoch, logs: epoch_seconds.__setitem__(
            -1, epoch_seconds[-1] + time.time()),
    )


def training_callbacks(plan: RunPlan, data, encoder, temperature, augment, epoch_seconds):
    """The run's callbacks and its batch order (None: uniform shuffling).

    The timer comes first, so an epoch's time includes the batch selection and not
    the evaluation; TensorBoard comes after the 1-NN callback, whose value it logs.
    """
    import emc2_tf

    callbacks, batch_order = [epoch_timer(epoch_seconds)], None
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
    if FLAGS.eval_every and emc2_tf.evaluation_unavailable(data) is None:
        callbacks.append(emc2_tf.KNNAccuracyCallback(encoder, data, FLAGS.eval_every))
    if plan.tensorboard_dir and plan.chief:  # one writer per cluster
        callbacks.append(emc2_tf.TrainingScalars(plan.tensorboard_dir, FLAGS.log_every_steps))
    return callbacks, batch_order


def stored_views(data, augment, strategy):
    """The K stored views of `--finite_augmentations` (drawn once with `--seed`), or None."""
    import emc2_tf

    if not FLAGS.finite_augmentations:
        return None
    if FLAGS.gradient_error_every and strategy.num_replicas_in_sync > 1:
        fail(f"--gradient_error_every measures on one device; --strategy={FLAGS.strategy} "
             f"runs {strategy.num_replicas_in_sync} replicas (use --strategy=default).")
    return emc2_tf.finite_views(data.train_images, FLAGS.finite_augmentations, augment,
                                seed=FLAGS.seed)


def gradient_monitor(plan: RunPlan, views):
    """`GlobalObjectiveMonitor` for `--gradient_error_every`, or None."""
    import emc2_tf

    if not FLAGS.gradient_error_every:
        return None
    log_dir = plan.tensorboard_dir if plan.tensorboard_dir and plan.chief else None
    return emc2_tf.GlobalObjectiveMonitor(views, FLAGS.gradient_error_every, log_dir=log_dir)


def open_checkpoint(plan: RunPlan, model, steps_per_epoch: int, batch_order, data):
    """`--overwrite`'s deletions, the run's `TrainingCheckpoint` (restored with
    `--resume`) and its flags.txt; returns `(checkpoint, resumed_from)`, both None
    without checkpoints. A finished run resumed exits here: nothing to train."""
    import emc2_tf

    if FLAGS.overwrite and not plan.resume and plan.chief and plan.tensorboard_dir and (
            os.path.isdir(plan.tensorboard_dir)):
        shutil.rmtree(plan.tensorboard_dir)  # the replaced run's curves would mix with this run's
    if not plan.directory:
        return None, None
    directory, resumed_from = plan.directory, None
    if FLAGS.overwrite and not plan.resume and plan.chief:
        remove_checkpoints(directory)
    checkpoint = emc2_tf.TrainingCheckpoint(
        directory, model, steps_per_epoch, every_n_steps=FLAGS.checkpoint_every_steps,
        keep=FLAGS.keep_checkpoints, batch_order=batch_order,
    )
    if plan.resume:
        resumed_from = restore_to_resume(checkpoint, directory)
        done_epochs, _ = checkpoint.position
        if resumed_from and done_epochs >= FLAGS.epochs:
            # Issue 13: a finished run; nothing is trained, written or exported again.
            print(f"{PROGRAM}: nothing left to train: {resumed_from} ends epoch "
                  f"{done_epochs} (global step {checkpoint.global_step}) and --epochs="
                  f"{FLAGS.epochs}; nothing was trained, written or exported. Pass a larger "
                  f"--epochs to train longer, or export it again with: "
                  f"{command('export', f'--checkpoint_dir={directory}')}", file=sys.stderr)
            sys.exit(0)
    if plan.chief:
        try:
            write_flags_file(directory, flags_file_text(FLAGS, run_flag_names()))
            write_data_file(directory, data)
        except OSError as error:
            fail(f"--checkpoint_dir={directory}: cannot write {FLAGS_FILE} or {DATA_FILE}: "
                 f"{error.strerror or error}.")
    return checkpoint, resumed_from


def announce(plan: RunPlan, built, checkpoint, resumed_from, steps_per_epoch: int) -> None:
    """Prints what is trained, whether it is evaluated, and where a resumed run continues."""
    import emc2_tf

    data, model = built.data, built.model
    start_epoch, start_step = checkpoint.position if checkpoint else (0, 0)
    print(f"Pre-training {built.encoder_name} with {FLAGS.method} on {data.name}: "
          f"N={data.num_train}, B={FLAGS.batch_size}, τ={model.temperature}, "
          f"{FLAGS.batch_selection} batches, {model.distribute_strategy.num_replicas_in_sync} "
          f"replica(s), {FLAGS.epochs} epochs of {steps_per_epoch} steps")
    unavailable = emc2_tf.evaluation_unavailable(data)
    if unavailable:
        print(f"no evaluation: {unavailable} (the 1-NN and the linear probe need labelled "
              "training and held-out images; --test_data_dir names a held-out folder)")
    if plan.resume:
        if resumed_from:
            print(f"resuming from {resumed_from}: epoch {start_epoch + 1}, step "
                  f"{start_step}/{steps_per_epoch}")
        else:
            print(f"no checkpoint in {plan.directory} yet: starting at step 0")


def fit_run(plan: RunPlan, model, make_dataset, checkpoint, callbacks) -> dict:
    """Trains to `--epochs` (from the checkpoint's position); returns the history.
    A non-finite step, a folder taken over or a full disk is one line."""
    import emc2_tf

    verbose = 1 if sys.stdout.isatty() else 2  # a live bar on a terminal; a line per epoch in a log
    try:
        if checkpoint:
            return emc2_tf.fit_with_checkpoints(
                model, make_dataset, FLAGS.epochs, checkpoint, callbacks, verbose=verbose)
        return model.fit(make_dataset(0, 0), epochs=FLAGS.epochs, callbacks=callbacks,
                         verbose=verbose).history
    except emc2_tf.NonFiniteError as error:  # issue 13: one line naming epoch and step
        if sys.stdout.isatty():
            print(file=sys.stdout)  # end the progress bar's line
        saved = (emc2_tf.list_checkpoints(plan.directory) if plan.directory and plan.chief
                 else [])
        kept = (f"the latest checkpoint, {saved[-1]}, holds finite weights" if saved
                else "no checkpoint was written")
        fail(f"{error} Nothing non-finite was saved ({kept}) and nothing exported; fix the "
             "cause (e.g. a lower --learning_rate), then start afresh with --overwrite.")
    except (emc2_tf.CheckpointError, emc2_tf.FolderInUseError) as error:
        fail(str(error))  # the folder checks above come first; these are their backstop
    except emc2_tf.SourceReadError as error:  # e.g. an image file damaged inside
        if sys.stdout.isatty():
            print(file=sys.stdout)
        fail(f"{error} Training stopped" + (
            f"; continue after fixing it with: "
            f"{command('train', '--resume', f'--checkpoint_dir={plan.directory}')}"
            if plan.directory else "."))
    except OSError as error:  # e.g. a full disk while writing a checkpoint
        fail(str(error).splitlines()[0] if str(error) else repr(error))


def exit_if_interrupted(plan: RunPlan, checkpoint, steps_per_epoch: int) -> None:
    """After SIGTERM/SIGINT: says where the run stopped and how to continue it (shell-
    quoted), and exits with 128 + the signal."""
    import emc2_tf

    if not checkpoint or checkpoint.interrupted is None:
        return
    epoch, step = checkpoint.position
    latest = emc2_tf.list_checkpoints(plan.directory)[-1] if plan.chief else plan.directory
    print(f"{PROGRAM}: interrupted by {signal.Signals(checkpoint.interrupted).name} at "
          f"epoch {epoch + 1}, step {step}/{steps_per_epoch}; saved {latest}; continue with: "
          f"{command('train', '--resume', f'--checkpoint_dir={plan.directory}')}",
          file=sys.stderr)
    sys.exit(128 + checkpoint.interrupted)


#: The held-out scores of the summary (None when the data cannot be evaluated).
EVALUATION_KEYS = ("knn_accuracy", "linear_probe_accuracy", "alignment", "uniformity",
                   "effective_rank")


def run_summary(built, history: dict, augment, train_seconds: float, epoch_seconds: list) -> dict:
    """The trained run's numbers: held-out 1-NN and probe, representation metrics,
    timings, the last logs and the state digest."""
    import numpy as np

    import emc2_tf

    data, model = built.data, built.model
    if emc2_tf.evaluation_unavailable(data) is None:
        results = emc2_tf.evaluate_encoder(built.encoder, data, representation=True,
                                           augment=augment)
    else:  # e.g. an unlabelled folder: no held-out scores (announced at the start)
        results = dict.fromkeys(EVALUATION_KEYS)
    summary = {
        "method": FLAGS.method,
        "dataset": data.name,
        "epochs": FLAGS.epochs,
        "batch_size": FLAGS.batch_size,
        "temperature": model.temperature,
        "batch_selection": FLAGS.batch_selection,
        "optimizer": FLAGS.optimizer,
        "weight_decay": FLAGS.weight_decay,
        "warmup_epochs": FLAGS.warmup_epochs,
        # The images trained on (--train_size subset or all), and per label.
        "train_size": data.num_train,
        # The held-out images scored (those with a label; 0 without evaluation).
        "held_out_size": 0 if results["knn_accuracy"] is None else len(
            emc2_tf.labelled_part(data.test_images, data.test_labels)[1]),
        "train_class_counts": {} if data.train_labels is None else {
            str(label): int(count) for label, count in
            zip(*np.unique(data.train_labels, return_counts=True))},
        **{key: results[key] for key in EVALUATION_KEYS},
        "train_seconds": train_seconds,
        # Median over epochs after the first (which includes tracing the step).
        "seconds_per_epoch": float(np.median(epoch_seconds[1:] or epoch_seconds or [0.0])),
        "final_loss": history["loss"][-1] if history.get("loss") else None,
        "global_step": int(model.optimizer.iterations.numpy()),
    }
    for name in built.model.step_metric_names:  # e.g. acceptance_rate, cache_staleness
        if history.get(name):
            summary[name] = history[name][-1]
    return summary


def publish(plan: RunPlan, built, summary: dict) -> None:
    """The chief exports the encoder (`--export`) and the held-out projector
    (`--projector`); their paths go into `summary`."""
    import emc2_tf

    if FLAGS.export and plan.chief:  # the other workers hold identical weights
        try:
            summary["export_path"] = emc2_tf.export_encoder(
                built.encoder, FLAGS.export_dir, plan.name)
        except (OSError, ValueError) as error:
            directory = plan.directory
            fail(f"--export_dir={FLAGS.export_dir}: {error} The trained run is in "
                 f"{directory or '(no checkpoints)'}" + (
                     f"; export it later with: "
                     f"{command('export', f'--checkpoint_dir={directory}')}" if directory
                     else "."))
    if (FLAGS.projector and plan.tensorboard_dir and plan.chief
            and built.data.test_images is not None):
        summary["projector"] = emc2_tf.export_projector(
            emc2_tf.embed(built.encoder, built.data.test_images), built.data.test_labels,
            os.path.join(plan.tensorboard_dir, "projector"))


def print_summary(summary: dict) -> None:
    """The human-readable lines, then the `summary: {...}` JSON line scripts parse."""
    if summary["knn_accuracy"] is not None:
        print(f"held-out 1-NN accuracy:        {summary['knn_accuracy']:.4f}")
        print(f"held-out linear-probe accuracy: {summary['linear_probe_accuracy']:.4f}")
    if "acceptance_rate" in summary:
        print(f"MH acceptance rate (last epoch): {summary['acceptance_rate']:.4f}")
    if "cache_staleness" in summary:
        print(f"cache: positive weight {summary['positive_weight']:.4f}, sampled rows "
              f"{summary['cache_staleness']:.1f} steps stale (last epoch)")
    if "global_objective" in summary:
        objective = summary["global_objective"]
        print(f"global objective at step {objective['step']}: F {objective['global_loss']:.4f}, "
              f"‖∇F‖² {objective['gradient_norm']:.4g}, ‖g − ∇F‖² "
              f"{objective['gradient_error']:.4g}")
    if "global_contrastive_loss" in summary:
        print(f"exact global contrastive loss:  "
              f"{summary['initial_global_contrastive_loss']:.4f} at the start, "
              f"{summary['global_contrastive_loss']:.4f} after")
    print(f"training time: {summary['train_seconds']:.1f} s "
          f"({summary['seconds_per_epoch']:.2f} s per epoch, median)")
    if "checkpoint_dir" in summary:
        print(f"checkpoints: {summary['checkpoint_dir']}")
    if "export_path" in summary:
        print(f"exported encoder: {summary['export_path']}")
    print("summary: " + json.dumps(summary, sort_keys=True))


def run() -> dict:
    """Trains one run as the flags say: checks, data, model, checkpoints, `fit`,
    evaluation, export; returns the summary it prints."""
    import emc2_tf

    started = time.time()
    if not checkpoint_dir(FLAGS) and (FLAGS.resume or FLAGS.resume_from is not None):
        fail("--resume needs checkpoints: --checkpoint_dir is empty.")
    strategy = start_strategy()
    plan = plan_outputs(strategy)
    data = load_run_data(PROGRAM, FLAGS)  # with the --train_size subset, if any
    if FLAGS.batch_size > data.num_train:
        fail(f"--batch_size={FLAGS.batch_size} exceeds the {data.num_train} training images.")
    check_warmup(PROGRAM, FLAGS)
    if plan.resume and plan.chief and plan.directory:
        check_same_data(plan.directory, data)
    claim_outputs(plan)
    augment = emc2_tf.AugmentConfig.for_dataset(FLAGS.dataset)
    views = stored_views(data, augment, strategy)
    built = build_run(PROGRAM, FLAGS, strategy, data, views)
    encoder, model = built.encoder, built.model
    steps_per_epoch = data.num_train // FLAGS.batch_size
    epoch_seconds = []
    callbacks, batch_order = training_callbacks(
        plan, data, encoder, model.temperature, augment, epoch_seconds)
    monitor = gradient_monitor(plan, views)
    if monitor is not None:
        callbacks.append(monitor)
    checkpoint, resumed_from = open_checkpoint(plan, model, steps_per_epoch, batch_order, data)

    def make_dataset(start_epoch: int, start_step: int):
        return emc2_tf.make_two_view_dataset(
            data.train_images if views is None else views, FLAGS.batch_size, augment,
            seed=FLAGS.seed, batch_order=batch_order, start_epoch=start_epoch,
            start_step=start_step,
        )

    monitor_global_loss = data.num_train <= 20000  # the exact loss is O(N²)
    if monitor_global_loss:
        initial_global_loss = emc2_tf.exact_global_contrastive_loss(
            encoder, data.train_images, model.temperature)
    announce(plan, built, checkpoint, resumed_from, steps_per_epoch)
    train_started = time.time()
    history = fit_run(plan, model, make_dataset, checkpoint, callbacks)
    train_seconds = time.time() - train_started
    exit_if_interrupted(plan, checkpoint, steps_per_epoch)

    summary = run_summary(built, history, augment, train_seconds, epoch_seconds)
    if monitor_global_loss:
        summary["initial_global_contrastive_loss"] = initial_global_loss
        summary["global_contrastive_loss"] = emc2_tf.exact_global_contrastive_loss(
            encoder, data.train_images, model.temperature)
    if monitor is not None and monitor.records:
        last = monitor.records[-1]
        summary["global_objective"] = {name: last[name] for name in (
            "step", "gradient_error", "gradient_norm", "global_loss")}
    summary["strategy"] = FLAGS.strategy
    summary["replicas"] = strategy.num_replicas_in_sync
    summary["state_digest"] = state_digest(model)
    if checkpoint:
        summary["checkpoint_dir"] = plan.directory
        summary["resumed_from"] = resumed_from
    publish(plan, built, summary)
    summary["total_seconds"] = time.time() - started
    print_summary(summary)
    return summary


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    logging.set_verbosity(logging.WARNING)
    if FLAGS.overwrite and (FLAGS.resume or FLAGS.resume_from is not None):
        fail("--overwrite deletes the run that --resume/--resume_from continues; pass one of "
             "them.")
    if FLAGS.resume or FLAGS.resume_from is not None:
        directory = (os.path.dirname(FLAGS.resume_from) if FLAGS.resume_from is not None
                     and not FLAGS["checkpoint_dir"].present else checkpoint_dir(FLAGS))
        FLAGS.checkpoint_dir = directory
        take_saved_flags(directory)
    check_method_flags(PROGRAM, FLAGS)
    check_flag_combinations(PROGRAM, FLAGS)
    import emc2_tf

    try:
        run()
    except emc2_tf.SourceReadError as error:  # outside fit (evaluation, the global loss)
        fail(str(error))


def cli() -> None:
    """The `emc2-train` console script (pyproject.toml): parses the flags, runs `main`."""
    from trainers.cli import run

    run(main, __doc__)


if __name__ == "__main__":  # python -m trainers.train
    cli()
