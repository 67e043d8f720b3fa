"""One writer per run folder (`emc2_tf.run_lock`): two real processes, a kill -9,
and the leftovers of a killed save.

The holder is a tiny Python process that loads `emc2_tf/run_lock.py` by its
path (stdlib only: no TensorFlow start-up), so the test takes about a second.
The CLI's refusal is checked in test_cli_production.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

import emc2_tf
from emc2_tf.run_lock import FolderInUseError, lock_run_folder
from helpers import ROOT

HOLDER = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
run_lock.lock_run_folder(sys.argv[2])
print("locked", flush=True)
time.sleep(120)
"""


def _start_holder(directory):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, os.path.join(ROOT, "emc2_tf", "run_lock.py"),
         str(directory)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _files(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_a_second_process_is_refused_and_a_killed_holders_lock_never_blocks(tmp_path):
    """Bugs caught (issue 19): two writers on one checkpoint folder were both
    accepted (no lock); a refusal that does not name the holder's pid and host, or
    that writes into the folder; a lock that outlives its killed holder (a lock
    file's presence or contents taken as the lock) and so blocks the resume."""
    directory = tmp_path / "ck"
    holder = _start_holder(directory)
    try:
        before = _files(directory)
        with pytest.raises(FolderInUseError) as error:
            lock_run_folder(str(directory))
        assert str(error.value).startswith(
            f"{directory} is in use by pid {holder.pid} on host {socket.gethostname()} "
            "(started ")
        assert _files(directory) == before  # the refused process wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the dead holder's lock; its description is still in the file.
    assert json.loads((directory / ".lock").read_text())["pid"] == holder.pid
    lock = lock_run_folder(str(directory))
    try:
        assert json.loads((directory / ".lock").read_text())["pid"] == os.getpid()
        assert lock_run_folder(str(directory)) is lock  # this process holds it already
    finally:
        lock.release()
    assert not lock.held


def test_training_checkpoint_refuses_a_folder_another_process_writes(tmp_path):
    """Bug caught: an API user's `TrainingCheckpoint` saved into a folder another
    process was training in (only the CLI was protected)."""
    import keras

    directory = tmp_path / "ck"
    holder = _start_holder(directory)
    try:
        keras.utils.set_random_seed(0)
        model = emc2_tf.build_model("simclr", encoder=emc2_tf.build_small_cnn_encoder((8, 8, 1)),
                                    dataset_size=8)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        checkpoint = emc2_tf.TrainingCheckpoint(str(directory), model, steps_per_epoch=1)
        before = _files(directory)
        with pytest.raises(FolderInUseError, match=f"in use by pid {holder.pid} on host "):
            checkpoint.save()
        assert _files(directory) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_temporary_folders_of_a_killed_save_are_removed_under_the_lock(tmp_path):
    """Bug caught: a SIGKILL mid-save left TensorFlow's `ckpt-N_temp/` folders behind
    for good. Taking the lock removes them, and nothing else."""
    directory = tmp_path / "ck"
    (directory / "ckpt-5_temp").mkdir(parents=True)
    (directory / "ckpt-5_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    (directory / "ckpt-10_temp").mkdir()
    (directory / "notes_temp").mkdir()  # not TensorFlow's: kept
    (directory / "ckpt-5.index").write_bytes(b"kept")
    (directory / "flags.txt").write_text("--method=emc2\n")
    lock = lock_run_folder(str(directory))
    lock.release()
    assert sorted(os.listdir(directory)) == [".lock", "ckpt-5.index", "flags.txt", "notes_temp"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
