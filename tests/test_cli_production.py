"""The production path through the CLIs: kill and resume, corrupt checkpoints,
flag files, evaluate/export, TensorBoard scalars.

Reference: EMC² on digits, 3 epochs of 22 steps, checkpoint every 5 steps.
A run killed (SIGKILL) or stopped (SIGTERM) mid-epoch and resumed with
`--resume` must end with the same weights, chain tables and global step,
compared by the trainer's SHA-256 `state_digest`.
"""

import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, parse_summary, run_python, untrained_scores

EPOCHS, STEPS = 3, 22  # digits: 1437 // 64 = 22 steps per epoch
TRAIN = ["-m", "trainers.train", f"--epochs={EPOCHS}", "--checkpoint_every_steps=5",
         "--eval_every=0", "--export=false"]


def _train(tmp, *extra, name="ck"):
    return run_python([*TRAIN, f"--checkpoint_dir={tmp / name}", "--tensorboard_dir=", *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    result = run_python([*TRAIN, f"--checkpoint_dir={tmp / 'ck'}",
                         f"--tensorboard_dir={tmp / 'tb'}", "--eval_every=1",
                         "--log_every_steps=11", "--model_name=ref"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert summary["global_step"] == EPOCHS * STEPS
    return tmp, summary


def _latest_step(directory):
    state = os.path.join(directory, "checkpoint")
    if not os.path.isfile(state):
        return -1
    with open(state) as handle:
        first = handle.readline()
    return int(first.rsplit("ckpt-", 1)[1].strip().strip('"')) if "ckpt-" in first else -1


def _start_training(tmp, name="ck"):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen(
        [sys.executable, *TRAIN, f"--checkpoint_dir={tmp / name}", "--tensorboard_dir="],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(process, directory, at_least, timeout=240):
    deadline = time.time() + timeout
    while _latest_step(directory) < at_least:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    """Also (issue 19): while the trainer runs, a second process is refused the
    folder, naming the trainer's pid and host; after the SIGKILL its leftover lock
    file does not block the resume, and a killed save's `ckpt-N_temp/` is removed."""
    import emc2_tf

    _, expected = reference
    process = _start_training(tmp_path)
    try:
        _wait_for_checkpoint(process, tmp_path / "ck", 25)  # epoch 2, step 3
        with pytest.raises(emc2_tf.FolderInUseError,
                           match=f"in use by pid {process.pid} on host {socket.gethostname()} "):
            emc2_tf.lock_run_folder(str(tmp_path / "ck"))
        process.kill()  # SIGKILL: no handler runs, nothing is flushed
    finally:
        process.kill()
        process.communicate()
    killed_at = _latest_step(tmp_path / "ck")
    assert 25 <= killed_at < EPOCHS * STEPS
    assert f'"pid": {process.pid},' in (tmp_path / "ck" / ".lock").read_text()  # stale
    (tmp_path / "ck" / f"ckpt-{killed_at + 1}_temp").mkdir()  # what a kill mid-save leaves
    result = _train(tmp_path, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "ck" / f"ckpt-{killed_at + 1}_temp").exists()
    summary = parse_summary(result.stdout)
    assert summary["resumed_from"].endswith(f"ckpt-{killed_at}")
    epoch, step = divmod(killed_at, STEPS)
    assert f"resuming from {summary['resumed_from']}: epoch {epoch + 1}, step {step}/{STEPS}" in (
        result.stdout)
    # Weights, EMC² chain tables and step count are those of the uninterrupted run.
    assert summary["global_step"] == expected["global_step"] == EPOCHS * STEPS
    assert summary["state_digest"] == expected["state_digest"]
    print(f"\nkilled with SIGKILL after ckpt-{killed_at} (epoch {epoch + 1}, step {step}); "
          f"resumed digest {summary['state_digest']} == uninterrupted {expected['state_digest']}")


def test_sigterm_saves_at_the_current_step_and_resume_matches(reference, tmp_path):
    """The run folder's name holds a space: the printed resume command, run as
    printed (split as a shell splits it), continues the run.

    Bug caught (issue 19): the printed command was not shell-quoted, so the
    folder's name split into two arguments."""
    _, expected = reference
    directory = tmp_path / "run dir"
    process = _start_training(tmp_path, name="run dir")
    try:
        _wait_for_checkpoint(process, directory, 5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("train:")]
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and "--resume" in lines[0]
    stopped_at = _latest_step(directory)
    assert f"ckpt-{stopped_at}" in lines[0] and 5 <= stopped_at < EPOCHS * STEPS
    printed = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert printed == ["python", "-m", "trainers.train", "--resume",
                       f"--checkpoint_dir={directory}"]
    result = run_python(printed[1:])  # the run's flags.txt supplies the rest
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert summary["resumed_from"].endswith(f"ckpt-{stopped_at}")
    assert summary["state_digest"] == expected["state_digest"]


def _digest(directory, lock=False):
    """SHA-256 of every file in `directory` by name; the lock file (which each run
    that takes the folder rewrites) only with `lock`."""
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(directory))
            if (directory / name).is_file() and (lock or name != ".lock")}


def _one_error(result, program):
    """The one `<program>: error:` line of a refused run (exit 2, no traceback, no
    TensorFlow checkpoint warnings)."""
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: ")]
    assert len(errors) == 1 and errors[0].startswith(f"{program}: error: "), result.stderr[-3000:]
    for noise in ("Traceback", "ParseError", "Checkpoint ignored"):
        assert noise not in result.stderr, result.stderr[-3000:]
    return errors[0]


def test_a_damaged_state_file_stops_every_program_and_loses_nothing(reference, tmp_path,
                                                                   capsys):
    """A garbled `checkpoint` state file beside ckpt-60, ckpt-65, ckpt-66: `--resume`,
    a new run, `evaluate` (and, the state file deleted, `export`) each stop with one
    line naming the checkpoints on disk and the flag that picks one; every file
    stays byte-identical.

    Bugs caught (issue 19): `--resume` logged four ParseError warnings, then
    started at step 0 with rc 0 and overwrote the run; a new run was not
    refused (the guard read only the state file); evaluate/export said the
    folder "holds no checkpoint yet".
    """
    directory = tmp_path / "ck"
    shutil.copytree(reference[0] / "ck", directory)
    (directory / "checkpoint").write_text("garbage\n")
    before = _digest(directory)
    newest = directory / "ckpt-66"
    found = (f"ckpt-60, ckpt-65, ckpt-66 on disk; its state file {directory / 'checkpoint'} "
             "does not parse")
    line = _one_error(run_python([*TRAIN, f"--checkpoint_dir={directory}", "--resume"]), "train")
    assert line.startswith(f"train: error: --resume: in --checkpoint_dir={directory}: {found}. "
                           ), line
    assert f"continue from ckpt-66 with --resume_from={newest} " in line, line
    assert _digest(directory) == before
    line = _one_error(run_python([*TRAIN, f"--checkpoint_dir={directory}",
                                  "--tensorboard_dir="]), "train")
    assert (f"--checkpoint_dir={directory} holds checkpoints of an earlier run ({found}); pass "
            f"--resume_from={newest} to continue it") in line, line
    assert _digest(directory) == before
    line = _one_error(run_python(["-m", "trainers.evaluate", f"--checkpoint_dir={directory}",
                                  "--linear_probe=false"]), "evaluate")
    assert line == (f"evaluate: error: --checkpoint_dir={directory}: {found}; choose one with "
                    f"--checkpoint={newest} (the newest complete one) or another ckpt-N on "
                    "disk."), line
    # The state file deleted: export's loader (evaluate's too), in this process to spare
    # a TensorFlow start-up.
    from trainers.common import load_trained_run

    (directory / "checkpoint").unlink()
    before = _digest(directory)
    with pytest.raises(SystemExit) as exit_code:
        load_trained_run("export", str(directory), None)
    assert exit_code.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line == (f"export: error: --checkpoint_dir={directory}: ckpt-60, ckpt-65, ckpt-66 on "
                    f"disk; its state file {directory / 'checkpoint'} is missing; choose one "
                    f"with --checkpoint={newest} (the newest complete one) or another ckpt-N "
                    "on disk."), line
    assert _digest(directory) == before


def test_corrupt_checkpoint_is_one_line_and_the_good_ones_stay(reference, tmp_path):
    result = _train(tmp_path, "--epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    directory = tmp_path / "ck"
    latest = directory / "ckpt-22.data-00000-of-00001"
    with open(latest, "r+b") as handle:
        handle.truncate(os.path.getsize(latest) // 3)
    before = _digest(directory)
    for command in ([*TRAIN, f"--checkpoint_dir={directory}", "--tensorboard_dir=", "--resume"],
                    ["-m", "trainers.evaluate", f"--checkpoint_dir={directory}"],
                    ["-m", "trainers.export", f"--checkpoint_dir={directory}",
                     f"--export_dir={tmp_path / 'sm'}"]):
        result = run_python(command)
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert "ckpt-22 cannot be restored" in errors[0] and "ckpt-20" in errors[0], errors[0]
        assert _digest(directory) == before  # nothing overwritten
    assert not (tmp_path / "sm").exists() or not os.listdir(tmp_path / "sm")
    # The good checkpoint the message names still works.
    result = _train(tmp_path, f"--resume_from={directory / 'ckpt-20'}", "--epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert parse_summary(result.stdout)["global_step"] == 22


def test_run_folder_guards_and_flagfile_repeat_the_run(reference, tmp_path):
    ref_dir, expected = reference
    # A second run into a folder with checkpoints is refused, naming the ways out.
    result = run_python([*TRAIN, f"--checkpoint_dir={ref_dir / 'ck'}", "--tensorboard_dir="])
    assert result.returncode == 2
    assert ("holds checkpoints of an earlier run (ckpt-60, ckpt-65, ckpt-66 on disk; the latest "
            "ckpt-66); pass --resume") in result.stderr
    # A bad flag is reported as such, even in a folder holding checkpoints (what a
    # user who ran `make demo` first sees with the default --checkpoint_dir).
    result = run_python([*TRAIN, f"--checkpoint_dir={ref_dir / 'ck'}", "--tensorboard_dir=",
                         "--dataset=fashion_mnist", f"--data_dir={tmp_path}"])
    assert result.returncode == 2 and "apt-get install dataset-fashion-mnist" in result.stderr
    # --resume refuses a changed run-defining flag.
    result = run_python([*TRAIN, f"--checkpoint_dir={ref_dir / 'ck'}", "--resume",
                         "--batch_size=32"])
    assert result.returncode == 2 and "--batch_size=32 differs from the run's --batch_size=64" in (
        result.stderr)
    # The saved flags.txt repeats the run bit for bit (flags after it override it).
    flags_file = ref_dir / "ck" / "flags.txt"
    text = flags_file.read_text()
    assert "--method=emc2" in text and "--batch_size=64" in text and "--resume" not in text
    assert "--gamma" not in text and "--kcl_" not in text  # other methods' options: refused
    result = run_python(["-m", "trainers.train", f"--flagfile={flags_file}",
                         f"--checkpoint_dir={tmp_path / 'ck'}", "--tensorboard_dir=",
                         "--eval_every=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert parse_summary(result.stdout)["state_digest"] == expected["state_digest"]
    # --overwrite starts afresh in the same folder (and ends the same), and
    # replaces the earlier run's TensorBoard logs (a copy of the reference's):
    # kept, TensorBoard would draw both runs' curves as one, each step twice.
    # It deletes every checkpoint file, also those a garbled state file does not
    # list (ckpt-61, a step this run never writes); and while another process
    # holds the folder (this one) it is refused before anything is deleted.
    import emc2_tf

    shutil.copytree(ref_dir / "tb", tmp_path / "tb")
    ck = tmp_path / "ck"
    for name in os.listdir(ck):
        if name.startswith("ckpt-60."):
            shutil.copy(ck / name, ck / name.replace("ckpt-60", "ckpt-61"))
    (ck / "checkpoint").write_text("garbage\n")
    overwrite = [*TRAIN, f"--checkpoint_dir={ck}", "--overwrite",
                 f"--tensorboard_dir={tmp_path / 'tb'}", "--model_name=ref"]
    lock = emc2_tf.lock_run_folder(str(ck))
    try:
        before, logs = _digest(ck, lock=True), sorted(os.listdir(tmp_path / "tb" / "ref"))
        line = _one_error(run_python(overwrite), "train")
        assert line.startswith(f"train: error: --checkpoint_dir={ck} is in use by pid "
                               f"{os.getpid()} on host {socket.gethostname()} (started "), line
        assert "nothing was written" in line, line
        assert _digest(ck, lock=True) == before
        assert sorted(os.listdir(tmp_path / "tb" / "ref")) == logs
    finally:
        lock.release()
    result = run_python(overwrite)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [name for name in os.listdir(ck) if name.startswith("ckpt-61")]
    summary = parse_summary(result.stdout)
    assert summary["resumed_from"] is None and summary["state_digest"] == expected["state_digest"]
    scalars = emc2_tf.read_scalars(str(tmp_path / "tb" / "ref"))
    assert [step for step, _ in scalars["train/loss"]] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert "step/loss" not in scalars  # the reference's --log_every_steps=11 logs are gone


def test_tensorboard_scalars(reference):
    """Bugs caught: scalars logged against the wrong step or with other values than
    the run's, and (1-NN) an encoder that does not learn: the former `> 0.5`
    bound held for the untrained encoder (0.894)."""
    import emc2_tf

    ref_dir, summary = reference
    scalars = emc2_tf.read_scalars(str(ref_dir / "tb" / "ref"))
    steps = [STEPS * (epoch + 1) for epoch in range(EPOCHS)]
    for tag in ("train/loss", "train/acceptance_rate", "train/out_of_batch_fraction",
                "train/learning_rate", "train/seconds_per_step", "train/knn_accuracy"):
        assert [step for step, _ in scalars[tag]] == steps, tag  # against the global step
    assert scalars["train/loss"][-1][1] == pytest.approx(summary["final_loss"], rel=1e-6)
    assert scalars["train/acceptance_rate"][-1][1] == pytest.approx(summary["acceptance_rate"],
                                                                    rel=1e-6)
    assert all(value == pytest.approx(1e-3) for _, value in scalars["train/learning_rate"])
    assert all(0 < value < 5 for _, value in scalars["train/seconds_per_step"])
    # Each epoch's held-out 1-NN beats the untrained encoder's (same flags and seed:
    # the same initial weights, checked by the initial global loss). Measured:
    # untrained 0.894; epochs 1–3 0.944, 0.967, 0.964.
    untrained = untrained_scores([*TRAIN[2:], "--eval_every=1"], linear_probe=False,
                                 global_loss=True)
    assert summary["initial_global_contrastive_loss"] == pytest.approx(
        untrained["initial_global_contrastive_loss"], rel=1e-5)
    assert all(untrained["knn_accuracy"] + 0.02 < value <= 1
               for _, value in scalars["train/knn_accuracy"]), (scalars, untrained)
    # --log_every_steps=11: running values twice per epoch.
    assert [step for step, _ in scalars["step/loss"]] == list(range(11, EPOCHS * STEPS + 1, 11))


def test_evaluate_and_export_a_checkpoint(reference, tmp_path):
    ref_dir, summary = reference
    result = run_python(["-m", "trainers.evaluate", f"--checkpoint_dir={ref_dir / 'ck'}",
                         f"--output_json={tmp_path / 'eval.json'}",
                         f"--projector_dir={tmp_path / 'projector'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = parse_summary(result.stdout.replace("evaluation: ", "summary: "))
    # The restored encoder evaluates exactly as the trained one did.
    assert evaluation["knn_accuracy"] == summary["knn_accuracy"]
    assert evaluation["linear_probe_accuracy"] == pytest.approx(summary["linear_probe_accuracy"],
                                                                abs=1e-9)
    assert evaluation["global_step"] == EPOCHS * STEPS
    assert (tmp_path / "eval.json").is_file()
    assert (tmp_path / "projector" / "projector_config.pbtxt").is_file()
    labels = (tmp_path / "projector" / "embedding_metadata.tsv").read_text().split()
    assert len(labels) == 360

    for version in (1, 2):  # exporting twice gives versions 1 and 2
        result = run_python(["-m", "trainers.export", f"--checkpoint_dir={ref_dir / 'ck'}",
                             f"--export_dir={tmp_path / 'sm'}"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"exported encoder: {tmp_path / 'sm' / 'ref' / str(version)}" in result.stdout
    assert sorted(os.listdir(tmp_path / "sm" / "ref")) == ["1", "2"]
    # The export serves the same embedding the checkpoint gives.
    served = run_python(["-m", "trainers.evaluate", f"--saved_model={tmp_path / 'sm' / 'ref' / '1'}",
                         "--linear_probe=false"])
    from_checkpoint = run_python(["-m", "trainers.evaluate", f"--checkpoint_dir={ref_dir / 'ck'}",
                                  "--features=embedding", "--linear_probe=false"])
    assert served.returncode == 0 and from_checkpoint.returncode == 0, served.stderr[-2000:]
    served = parse_summary(served.stdout.replace("evaluation: ", "summary: "))
    from_checkpoint = parse_summary(from_checkpoint.stdout.replace("evaluation: ", "summary: "))
    assert served["knn_accuracy"] == from_checkpoint["knn_accuracy"]


@pytest.mark.parametrize("program,args,message", [
    ("evaluate", [], "give exactly one of --checkpoint_dir"),
    ("evaluate", ["--checkpoint_dir=/nonexistent"], "/nonexistent/flags.txt does not exist"),
    ("evaluate", ["--saved_model=/nonexistent"], "is not a SavedModel folder"),
    ("export", ["--checkpoint_dir=/nonexistent"], "/nonexistent/flags.txt does not exist"),
    ("train", ["--resume", "--checkpoint_dir=/nonexistent"], "nothing to resume"),
    # Issue 19: --overwrite deleted the checkpoints --resume was to continue.
    ("train", ["--resume", "--overwrite", "--checkpoint_dir=/nonexistent"],
     "--overwrite deletes the run that --resume/--resume_from continues; pass one of them."),
    ("train", ["--checkpoint_every_steps=-1"], "--checkpoint_every_steps must be ≥ 0"),
    ("train", ["--model_name=a/b"], "--model_name must be a plain folder name"),
])
def test_bad_flags_are_one_line(program, args, message):
    result = run_python(["-m", f"trainers.{program}", *args])
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_helpfull_documents_every_flag():
    result = run_python(["-m", "trainers.train", "--helpfull"])
    assert result.returncode in (0, 1), result.stderr[-2000:]
    text = result.stdout + result.stderr
    for flag in ("--checkpoint_every_steps", "--keep_checkpoints", "--resume_from",
                 "--[no]overwrite", "--log_every_steps", "--[no]projector", "--flagfile"):
        assert flag in text, flag
    assert "Continue the run in --checkpoint_dir from its latest checkpoint" in text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
