"""Crash-safe training checkpoints and exact resume.

A checkpoint holds everything a run needs to continue as if it had never
stopped:

- the model's weights, which include every per-sample state (EMC²'s
  `chain_index` / `chain_log_score`, SogCLR's `log_u`);
- the optimizer (its slots and `iterations`, the global step: epoch and
  step within the epoch follow from it and `steps_per_epoch`);
- the model's `SeedGenerator` state (the MH uniforms);
- the batch order's state, if it has one (`SpectralBatchSelection`'s
  current selection).

The data order and the augmentations are functions of `(seed, epoch, step)`
(`make_two_view_dataset`), so nothing of the input pipeline needs saving:
`fit_with_checkpoints` rebuilds the stream at the saved position. On CPU a
resumed run then ends bit-identical to the uninterrupted one (the
kill-and-resume test checks it); on GPU, kernels that are not deterministic
(unless `tf.config.experimental.enable_op_determinism()`) make it equal up to
float round-off.

Why `tf.train.CheckpointManager` and not `keras.callbacks.BackupAndRestore`:
Keras' callback overwrites one `.weights.h5` file in place (a kill during
the write loses the only backup) and resumes at the start of the
interrupted epoch. TensorFlow's checkpoint writes the shards to a temporary
prefix, merges them, and only then points the `checkpoint` state file
(written with an atomic rename) at the new checkpoint; a kill at any point
leaves the previous checkpoint complete. The manager keeps the last `keep`
and deletes older ones only after a new one is complete.

The files are the truth, the state file a hint (issue 19): TensorFlow's
`tf.train.latest_checkpoint` returns None for a damaged or deleted state
file, and a resume then started at step 0 and overwrote the run.
`list_checkpoints` finds checkpoints from their `ckpt-<step>.*` files;
`latest_checkpoint` (what `restore()` continues from) is the newest
complete one, and only when the state file names it; otherwise it raises
`CheckpointStateError` naming what is on disk, and the checkpoint to
continue from must be given by its path. One process writes a folder
(`lock_run_folder`), and never into an earlier run's checkpoints it did not
restore (`TrainingCheckpoint.claim_folder`).

Never saved: weights holding NaN or inf (`save` raises `NonFiniteError`);
a write that fails (a full disk) removes what it wrote and raises `OSError`.

Not saved: the running means of the logged metrics, so the epoch a run
resumes in logs the mean of its steps after the resume only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from typing import Any, Callable

import keras
import tensorflow as tf

from emc2_tf.run_lock import lock_run_folder
from emc2_tf.safety import check_finite_variables

CHECKPOINT_NAME = "ckpt"


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not belong to this run."""


#: TensorFlow's state file in a checkpoint folder: the list of checkpoints and the
#: latest. A hint, not the truth (see `latest_checkpoint`).
STATE_FILE = "checkpoint"

#: A checkpoint's files: `ckpt-<step>.index` and `ckpt-<step>.data-<k>-of-<n>`.
_CHECKPOINT_FILE = re.compile(
    rf"^{CHECKPOINT_NAME}-(\d+)\.(?:index|data-(\d{{5}})-of-(\d{{5}}))$")


class CheckpointStateError(CheckpointError):
    """The `checkpoint` state file is missing, damaged, or does not name the newest
    complete checkpoint on disk: which checkpoint continues the run is then not
    known, and only an explicit choice may restore one.

    Attributes:
        directory: the checkpoint folder.
        on_disk: its complete checkpoints (prefixes), oldest first.
        problem: what is wrong with the state file, e.g. "its state file
            D/checkpoint does not parse".
    """

    def __init__(self, directory: str, on_disk: list[str], problem: str):
        self.directory, self.on_disk, self.problem = directory, list(on_disk), problem
        if on_disk:
            way_out = (f"restore one explicitly by its path (the newest complete one is "
                       f"{on_disk[-1]})")
        else:
            way_out = "there is nothing to restore"
        super().__init__(f"{directory}: {self.summary}; {way_out}.")

    @property
    def summary(self) -> str:
        """ "ckpt-44, ckpt-66, ckpt-88 on disk; its state file ... does not parse"."""
        names = checkpoint_names(self.on_disk) if self.on_disk else "no complete checkpoint"
        return f"{names} on disk; {self.problem}"


def checkpoint_names(prefixes: list[str]) -> str:
    """ "ckpt-44, ckpt-66, ckpt-88" (the first two, "…" and the last three beyond five)."""
    names = [os.path.basename(p) for p in prefixes]
    if len(names) > 5:
        names = [*names[:2], f"… ({len(prefixes)} in all)", *names[-3:]]
    return ", ".join(names)


def _files_by_step(directory: str) -> dict[int, set[str]]:
    """The checkpoint files in `directory` by global step (any, complete or not)."""
    steps: dict[int, set[str]] = {}
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            match = _CHECKPOINT_FILE.match(name)
            if match and os.path.isfile(os.path.join(directory, name)):
                steps.setdefault(int(match.group(1)), set()).add(name)
    return steps


def _missing_files(step: int, names: set[str]) -> list[str]:
    """The files a complete `ckpt-<step>` would have and `names` lacks: its index, and
    every data shard `k` of `n` (an index without any data file lacks shard 0 of 1)."""
    prefix = f"{CHECKPOINT_NAME}-{step}"
    missing = [] if f"{prefix}.index" in names else [f"{prefix}.index"]
    counts = {int(m.group(3)) for m in map(_CHECKPOINT_FILE.match, names) if m.group(3)}
    for count in sorted(counts) or [1]:
        missing += [f"{prefix}.data-{k:05d}-of-{count:05d}" for k in range(count)
                    if f"{prefix}.data-{k:05d}-of-{count:05d}" not in names]
    return missing


def list_checkpoints(directory: str) -> list[str]:
    """The complete checkpoints in `directory` (prefixes `<directory>/ckpt-<step>`), oldest
    first, found from their files: `ckpt-<step>.index` and every data shard.

    The `checkpoint` state file is not read: a damaged or deleted one hides
    nothing here (issue 19). Which one a run continues from is
    `latest_checkpoint`'s decision.
    """
    return [os.path.join(directory, f"{CHECKPOINT_NAME}-{step}")
            for step, names in sorted(_files_by_step(directory).items())
            if not _missing_files(step, names)]


def checkpoint_files(directory: str) -> list[str]:
    """Every checkpoint file in `directory` (`ckpt-<step>.index`, `.data-*`), complete
    checkpoints or not: what `--overwrite` deletes, and what makes a folder an earlier
    run's."""
    return sorted(name for names in _files_by_step(directory).values() for name in names)


def _state_entries(directory: str) -> tuple[list[str] | None, str | None]:
    """The state file's checkpoints (names `ckpt-<step>`, the latest last), or None and
    why it cannot be read. Parsed here, not by `tf.train.get_checkpoint_state`, which
    logs two warnings and returns None for a damaged file (or raises for an empty one),
    with the parser and message type TensorFlow's `CheckpointManager` reads it with (so
    a file accepted here is accepted there)."""
    from tensorflow.python.checkpoint import checkpoint_management

    text_format = checkpoint_management.text_format  # protobuf's, as TensorFlow imports it
    CheckpointState = checkpoint_management.CheckpointState

    path = os.path.join(directory, STATE_FILE)
    if not os.path.lexists(path):
        return None, f"its state file {path} is missing"
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except OSError as error:
        return None, f"its state file {path} cannot be read ({error.strerror or error})"
    except UnicodeDecodeError:
        return None, f"its state file {path} does not parse (not text)"
    state = CheckpointState()
    try:
        text_format.Merge(text, state)
    except text_format.ParseError:
        return None, f"its state file {path} does not parse"
    if not state.model_checkpoint_path:
        return None, f"its state file {path} names no checkpoint"
    entries = [os.path.basename(p) for p in state.all_model_checkpoint_paths]
    latest = os.path.basename(state.model_checkpoint_path)
    return [*[e for e in entries if e != latest], latest], None


def latest_checkpoint(directory: str) -> str | None:
    """The checkpoint a run in `directory` continues from: the newest complete one on
    disk, provided the `checkpoint` state file agrees.

    The rule (issue 19): the files are the truth, the state file a hint that
    must agree with them. Returns None when the folder holds no checkpoint
    file and no state file. Raises `CheckpointStateError` (one line, naming
    the checkpoints on disk) when the state file is missing beside
    checkpoint files, cannot be read or parsed, or names as the latest
    anything but the newest complete checkpoint on disk (its files missing
    or incomplete, or a newer one present). A kill between writing a
    checkpoint and recording it leaves that state too: restore a checkpoint
    by its path then (`TrainingCheckpoint.restore(path)`, `--resume_from`).
    Older entries that are gone (deleted by `keep`), and older complete
    checkpoints it does not list, are allowed.
    """
    on_disk = list_checkpoints(directory)
    entries, problem = _state_entries(directory)
    if entries is None:
        if not on_disk and not os.path.lexists(os.path.join(directory, STATE_FILE)):
            return None
        raise CheckpointStateError(directory, on_disk, problem)
    latest = entries[-1]
    if on_disk and os.path.basename(on_disk[-1]) == latest:
        return on_disk[-1]
    state = os.path.join(directory, STATE_FILE)
    if any(os.path.basename(p) == latest for p in on_disk):
        problem = (f"its state file {state} names {latest} as the latest, but "
                   f"{os.path.basename(on_disk[-1])} on disk is newer")
    else:
        step = checkpoint_step(latest) if _CHECKPOINT_FILE.match(latest + ".index") else None
        names = _files_by_step(directory).get(step, set()) if step is not None else set()
        missing = ("none of its files is on disk" if not names
                   else f"{', '.join(_missing_files(step, names))} missing")
        problem = f"its state file {state} names {latest} as the latest, but {missing}"
    raise CheckpointStateError(directory, on_disk, problem)


def checkpoint_summary(directory: str) -> str | None:
    """What `directory` holds of a run's checkpoints, in one phrase for messages (e.g.
    "ckpt-60, ckpt-65, ckpt-66 on disk; the latest ckpt-66"); None when it holds no
    checkpoint file and no state file."""
    try:
        latest = latest_checkpoint(directory)
    except CheckpointStateError as error:
        return error.summary
    if latest is not None:
        return (f"{checkpoint_names(list_checkpoints(directory))} on disk; the latest "
                f"{os.path.basename(latest)}")
    files = checkpoint_files(directory)
    if not files:
        return None
    more = ", …" if len(files) > 3 else ""
    return f"incomplete checkpoint files on disk ({', '.join(files[:3])}{more})"


def checkpoint_step(path: str) -> int:
    """The global step a checkpoint prefix `.../ckpt-<step>` was written at."""
    match = re.search(rf"{CHECKPOINT_NAME}-(\d+)$", path)
    if not match:
        raise CheckpointError(
            f"{path!r} is not a checkpoint prefix (expected '<directory>/{CHECKPOINT_NAME}-<step>')."
        )
    return int(match.group(1))


class TrainingCheckpoint(keras.callbacks.Callback):
    """Saves every `every_n_steps` steps, at each epoch end, at the end of
    training and when the process receives SIGTERM or SIGINT; restores.

    ```python
    checkpoint = emc2_tf.TrainingCheckpoint("checkpoints/emc2", model, steps_per_epoch=22)
    checkpoint.restore()  # the latest, if any: position (epoch, step)
    emc2_tf.fit_with_checkpoints(model, make_dataset, epochs=30, checkpoint=checkpoint)
    ```

    On SIGTERM (a preemption notice) or SIGINT (Ctrl-C) the current step
    finishes, a checkpoint is written, training stops and `interrupted`
    holds the signal number; a second signal acts as usual (the handler is
    the previous one again).

    Never loses an earlier run (issue 19): `restore()` trusts the
    `checkpoint` state file only when it names the newest complete
    checkpoint on disk (`latest_checkpoint`), and before its first write
    (at the start of `fit`, or the first `save`) this callback
    - locks the folder for the rest of the process (`lock_run_folder`): a
      second process writing it gets `FolderInUseError` naming the holder;
    - refuses (`CheckpointError`) a folder that holds checkpoints when it
      has not called `restore()`: its saves would overwrite or delete them.
      Restore one to continue that run, or delete them to start afresh.

    Args:
        directory: where the checkpoints go (`ckpt-<global step>.*` and the
            `checkpoint` state file).
        model: a compiled `ContrastiveModel` (its optimizer must exist).
        steps_per_epoch: batches per epoch; stored, and checked on restore
            (a changed batch size would misplace the resume).
        every_n_steps: also save every this many global steps (0 = only at
            epoch ends, end of training and on a signal).
        keep: how many recent checkpoints to keep.
        batch_order: the dataset's batch order, saved too if it has a
            `checkpoint_state` (`SpectralBatchSelection`).
        handle_signals: install the SIGTERM/SIGINT handlers during `fit`.
    """

    def __init__(
        self,
        directory: str,
        model: keras.Model,
        steps_per_epoch: int,
        every_n_steps: int = 0,
        keep: int = 3,
        batch_order: Any = None,
        handle_signals: bool = True,
    ):
        super().__init__()
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be an integer ≥ 1; got {steps_per_epoch!r}.")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an integer ≥ 0; got {every_n_steps!r}.")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer ≥ 1; got {keep!r}.")
        if getattr(model, "optimizer", None) is None:
            raise ValueError("compile the model before creating its TrainingCheckpoint "
                             "(the optimizer's state is part of the checkpoint).")
        self.directory = directory
        self.steps_per_epoch = steps_per_epoch
        self.every_n_steps = every_n_steps
        self.handle_signals = handle_signals
        self.interrupted: int | None = None
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._last_saved_step = -1
        self._restore_called = False  # restore() accepted the folder's checkpoints
        self._claimed = False  # locked and checked before the first write
        self._manager: tf.train.CheckpointManager | None = None
        self._keep = keep
        with model.distribute_strategy.scope():
            self._steps_per_epoch = tf.Variable(steps_per_epoch, dtype=tf.int64, trainable=False)
        items = {
            "model": model,
            "optimizer": model.optimizer,
            "steps_per_epoch": self._steps_per_epoch,
        }
        seed_generator = getattr(model, "seed_generator", None)
        if seed_generator is not None:
            items["seed_generator"] = seed_generator.state
        if getattr(batch_order, "checkpoint_state", None) is not None:
            items["batch_order"] = batch_order.checkpoint_state
        self.checkpoint = tf.train.Checkpoint(**items)
        self._model_ref = model
        write_directory = directory
        strategy = model.distribute_strategy
        from emc2_tf.distribute import is_chief

        if not is_chief(strategy):
            # Every worker must take part in a save under MultiWorkerMirroredStrategy;
            # only the chief's copy is kept (TensorFlow's multi-worker recipe).
            task = strategy.cluster_resolver.task_id
            write_directory = os.path.join(directory, f".worker-{task}")
        self._write_directory = write_directory

    # The folder ---------------------------------------------------------------

    @property
    def manager(self) -> tf.train.CheckpointManager:
        """The `tf.train.CheckpointManager` that writes and prunes the checkpoints.

        Built at the first write, after `claim_folder`: its constructor reads
        the state file, which must be sound by then. A damaged one (which
        `restore()` refused, so the run restored a checkpoint by its path) is
        removed first; TensorFlow would log warnings, or raise for an empty
        file, and its first save replaces it anyway.
        """
        if self._manager is None:
            self.claim_folder()
            if _state_entries(self._write_directory)[0] is None:
                state = os.path.join(self._write_directory, STATE_FILE)
                if os.path.isfile(state):
                    os.remove(state)
            self._manager = tf.train.CheckpointManager(
                self.checkpoint, self._write_directory, max_to_keep=self._keep,
                checkpoint_name=CHECKPOINT_NAME)
        return self._manager

    def claim_folder(self) -> None:
        """Makes this process the folder's one writer, before anything is written.

        The chief (the only writer of `directory`) takes the folder's lock
        (`FolderInUseError` if another live process holds it) and then
        refuses, with `CheckpointError`, a folder that holds checkpoints this
        callback did not `restore()`. Called by `fit` and `save`; idempotent.
        """
        if self._claimed:
            return
        if self._write_directory == self.directory:  # the chief
            lock_run_folder(self.directory)
            found = checkpoint_summary(self.directory)
            if found and not self._restore_called:
                raise CheckpointError(
                    f"{self.directory} holds checkpoints of an earlier run ({found}), and none "
                    "was restored: saving would overwrite or delete them. Call restore() to "
                    "continue that run, or delete them (or choose another directory) to "
                    "start afresh.")
        self._claimed = True

    # Position -----------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """Training steps taken so far (the optimizer's `iterations`)."""
        return int(self._model_ref.optimizer.iterations.numpy())

    @property
    def position(self) -> tuple[int, int]:
        """`(epoch, step within the epoch)` of the next training step."""
        return divmod(self.global_step, self.steps_per_epoch)

    # Restore ------------------------------------------------------------------

    def restore(self, path: str | None = None, check_steps_per_epoch: bool = True) -> str | None:
        """Restores `path`, or the latest checkpoint in `directory`; returns its path.

        Without `path`, the latest is `latest_checkpoint(directory)` (the
        chief's, on every worker): the newest complete checkpoint on disk,
        provided the `checkpoint` state file names it. Returns None (and
        changes nothing) when the folder holds no checkpoint file and no
        state file.

        Raises `CheckpointError` with a one-line reason when the checkpoint
        cannot be read (truncated or corrupt files), was written by a
        different model, or (unless `check_steps_per_epoch` is False, e.g.
        to evaluate or export it) with a different `steps_per_epoch`; its
        subclass `CheckpointStateError` when the state file is missing,
        damaged or disagrees with the files (a silent fresh start would then
        overwrite the run): pass the `path` of the checkpoint to continue.
        """
        if path is None:
            path = latest_checkpoint(self.directory)
            if path is None:
                self._restore_called = True  # nothing to keep: saves may start here
                return None
        others = [p for p in list_checkpoints(self.directory) if p != path]
        hint = (f" Earlier checkpoints in {self.directory}: "
                f"{', '.join(os.path.basename(p) for p in others)}; resume from one of them "
                "explicitly." if others else "")
        if not tf.io.gfile.exists(path + ".index"):
            raise CheckpointError(f"checkpoint {path} does not exist (no {path}.index).{hint}")
        model = self._model_ref
        if not model.optimizer.built:  # its slots must exist to be restored, not deferred
            with model.distribute_strategy.scope():
                model.optimizer.build(model.trainable_variables)
        try:
            status = self.checkpoint.read(path)
            status.assert_existing_objects_matched().expect_partial()  # save_counter
        except (tf.errors.OpError, ValueError, AssertionError, KeyError, IndexError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if len(reason) > 300:
                reason = reason[:300] + "…"
            raise CheckpointError(
                f"checkpoint {path} cannot be restored: {reason}. The file is truncated or "
                f"corrupt, or it was written by a different model (method, encoder, data set "
                f"size).{hint}"
            ) from None
        saved = int(self._steps_per_epoch.numpy())
        if check_steps_per_epoch and saved != self.steps_per_epoch:
            raise CheckpointError(
                f"checkpoint {path} was written with {saved} steps per epoch, this run has "
                f"{self.steps_per_epoch}: the batch size or the data set changed; resume with "
                "the flags the run was started with."
            )
        self._last_saved_step = self.global_step
        # Restored from this folder: its saves continue this run. (A checkpoint of another
        # folder does not make this folder's earlier checkpoints this run's.)
        self._restore_called = os.path.realpath(os.path.dirname(path)) == os.path.realpath(
            self.directory)
        return path

    def release(self) -> None:
        """Gives up the folder's lock (taken at the first write), e.g. to let another
        process continue the run while this one lives on (a notebook)."""
        if self._claimed and self._write_directory == self.directory:
            lock_run_folder(self.directory).release()
        self._claimed = False

    # Save ---------------------------------------------------------------------

    def save(self) -> str:
        """Writes a checkpoint at the current global step; returns its path.

        Refuses weights holding NaN or inf (`NonFiniteError`). A failed write
        (a full disk: `OSError`, one line) removes what it left, so the
        previous checkpoint stays the latest and nothing is half-written.
        """
        self.claim_folder()
        step = self.global_step
        prefix = f"{CHECKPOINT_NAME}-{step}"
        recorded = list_checkpoints(self._write_directory)
        latest = os.path.basename(recorded[-1]) if recorded else "none"
        check_finite_variables(
            self._model_ref.trainable_variables,
            f"refusing to write checkpoint {prefix} in {self.directory} (the latest stays "
            f"{latest})")
        self._steps_per_epoch.assign(self.steps_per_epoch)
        try:
            path = self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as error:
            self._remove_partial(prefix)
            reason = (error.strerror if isinstance(error, OSError) and error.strerror
                      else str(getattr(error, "message", error)).strip().splitlines()[0])
            message = (f"cannot write checkpoint {os.path.join(self.directory, prefix)}: "
                       f"{reason}; nothing of it is left, the latest checkpoint stays {latest}.")
            code = getattr(error, "errno", None)
            raise (OSError(code, message) if code else OSError(message)) from None
        self._last_saved_step = step
        if self._write_directory != self.directory:
            shutil.rmtree(self._write_directory, ignore_errors=True)
            path = os.path.join(self.directory, os.path.basename(path))
        return path

    def _remove_partial(self, prefix: str) -> None:
        """Deletes what a failed write of `prefix` left (its shards, TensorFlow's
        `<prefix>_temp` folder, a temporary state file), unless the state file
        already records it as complete."""
        directory = self._write_directory
        if not os.path.isdir(directory) or prefix in (_state_entries(directory)[0] or []):
            return
        for name in os.listdir(directory):
            if (name == prefix + "_temp" or name.startswith(prefix + ".")
                    or name.startswith("checkpoint.tmp")):
                path = os.path.join(directory, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.remove(path)
                    except OSError:
                        pass

    def _save_if_new(self) -> None:
        if self.global_step != self._last_saved_step:
            self.save()

    def _on_signal(self, signum, frame):
        self._signal = signum
        # A second signal acts as it would without us (e.g. Ctrl-C twice).
        signal.signal(signum, self._previous_handlers.get(signum, signal.SIG_DFL))

    def on_train_begin(self, logs=None):
        self.claim_folder()  # before the first step: a refused folder costs no training
        self.interrupted = None
        self._signal = None
        if self.handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
                except ValueError:  # not the main thread: leave signals alone
                    break

    def on_train_batch_end(self, batch, logs=None):
        if self._signal is not None:
            self.save()
            self.interrupted = self._signal
            self.model.stop_training = True
        elif self.every_n_steps and self.global_step % self.every_n_steps == 0:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        self._save_if_new()

    def on_train_end(self, logs=None):
        if self._signal is not None and self.interrupted is None:
            self.interrupted = self._signal  # arrived after the last step
        try:
            self._save_if_new()
        finally:
            self.restore_signal_handlers()

    def restore_signal_handlers(self) -> None:
        """Puts back the SIGTERM/SIGINT handlers `fit` replaced (also when it raised)."""
        for signum, handler in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler)
        self._previous_handlers.clear()


def fit_with_checkpoints(
    model: keras.Model,
    make_dataset: Callable[[int, int], tf.data.Dataset],
    epochs: int,
    checkpoint: TrainingCheckpoint,
    callbacks: list | None = None,
    verbose: Any = "auto",
) -> dict[str, list]:
    """`model.fit` from the checkpoint's position to `epochs`; returns the history.

    Args:
        make_dataset: `(start_epoch, start_step) -> dataset`, e.g.
            `lambda e, k: make_two_view_dataset(images, B, seed=0,
            start_epoch=e, start_step=k)`.
        epochs: the run's total epochs.
        checkpoint: restored (or fresh) `TrainingCheckpoint`; it is added to
            the callbacks.

    A run interrupted mid-epoch first finishes that epoch (one `fit` over
    the rest of it), then trains the remaining epochs. Stops early if a
    signal interrupted training (`checkpoint.interrupted`).
    """
    epoch, step = checkpoint.position
    history: dict[str, list] = {}
    spans = []
    if step:
        spans.append((epoch, step, epoch + 1))
        epoch += 1
    if epoch < epochs:
        spans.append((epoch, 0, epochs))
    for start_epoch, start_step, end_epoch in spans:
        if start_epoch >= epochs:
            break
        try:
            result = model.fit(
                make_dataset(start_epoch, start_step),
                initial_epoch=start_epoch,
                epochs=end_epoch,
                callbacks=[checkpoint, *(callbacks or [])],
                verbose=verbose,
            )
        finally:  # e.g. NonFiniteError: Keras then skips on_train_end
            checkpoint.restore_signal_handlers()
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
        if checkpoint.interrupted is not None:
            break
    return history
