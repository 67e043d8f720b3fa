"""The command line and the README's Python example, run for real."""

import os
import re

import pytest

from helpers import ROOT, parse_summary, run_python, untrained_scores


def test_train_cli_trains_evaluates_and_exports(tmp_path):
    """Bug caught (accuracy part): a trainer whose encoder does not learn. The
    untrained encoder (same flags and seed: same initial weights, checked by the
    initial global loss) already scores 1-NN 0.894, probe 0.922 on digits; two
    epochs of EMC² measured 0.964 / 0.958 (seeds 1, 2: +0.058/+0.053 1-NN,
    +0.039/+0.058 probe over their own untrained encoders)."""
    args = ["--epochs=2", "--batch_size=32", "--eval_every=1", f"--export_dir={tmp_path / 'sm'}",
            f"--tensorboard_dir={tmp_path / 'tb'}", "--temperature=0.1",
            f"--checkpoint_dir={tmp_path / 'ck'}"]
    result = run_python(["-m", "trainers.train", *args], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    untrained = untrained_scores(args, global_loss=True)
    assert summary["initial_global_contrastive_loss"] == pytest.approx(
        untrained["initial_global_contrastive_loss"], rel=1e-5)  # the same initial weights
    assert summary["knn_accuracy"] > untrained["knn_accuracy"] + 0.03, (summary, untrained)
    assert summary["linear_probe_accuracy"] > untrained["linear_probe_accuracy"] + 0.02, (
        summary, untrained)
    assert 0.0 < summary["acceptance_rate"] < 1.0
    assert summary["export_path"] == str(tmp_path / "sm" / "emc2" / "1")
    assert os.path.isfile(os.path.join(summary["export_path"], "saved_model.pb"))
    assert "held-out 1-NN accuracy" in result.stdout
    assert os.listdir(tmp_path / "tb" / "emc2")  # TensorBoard event files
    assert sorted(os.listdir(tmp_path / "ck")) == [
        ".lock", "checkpoint", "ckpt-44.data-00000-of-00001", "ckpt-44.index",
        "ckpt-88.data-00000-of-00001", "ckpt-88.index", "data.txt", "flags.txt"]


def test_cli_rejects_bad_flags_with_one_clear_line(tmp_path):
    for flag, message in (("--temperature=0", "--temperature must be > 0"),
                          ("--batch_size=1", "--batch_size must be ≥ 2"),
                          ("--method=nope", "method"),
                          ("--dataset=fashion_mnist", "apt-get install dataset-fashion-mnist")):
        extra = [f"--data_dir={tmp_path}"] if "fashion" in flag else []
        result = run_python(["-m", "trainers.train", flag, *extra, "--epochs=1"], cwd=ROOT)
        assert result.returncode != 0
        assert message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_readme_python_example_runs(tmp_path):
    """Bug caught (accuracy part): the README's example training nothing useful. The
    test evaluates the example's encoder before `model.fit` and after it. The
    example seeds its encoder (`keras.utils.set_random_seed(0)`): measured with
    seeds 0–5, untrained 1-NN 0.883–0.928 and the 1-NN gain 0.031–0.092 (seed 0:
    0.894 -> 0.972, gain 0.078); unseeded, one run drew a 0.028 gain and failed
    the +0.03 bar."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    example = re.search(r"## Use it from Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert "emc2_tf.EMC2Model(" in example and "model.fit(" in example
    assert "keras.utils.set_random_seed(0)" in example  # the measured seed (docstring)
    fit = re.search(r"^model\.fit\(.*$", example, re.M).group(0)
    script = example.replace(
        fit, "print('untrained:', emc2_tf.evaluate_encoder(encoder, data, linear_probe=False))\n"
        + fit)
    result = run_python(["-c", script], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    untrained = re.search(r"^untrained: \{.*?'knn_accuracy': ([0-9.]+)", result.stdout, re.M)
    accuracy = re.search(r"^\{.*?'knn_accuracy': ([0-9.]+)", result.stdout, re.M)
    assert untrained and accuracy, result.stdout[-2000:]
    assert float(accuracy.group(1)) > float(untrained.group(1)) + 0.03, (untrained, accuracy)
    assert os.path.isdir(tmp_path / "savedmodels" / "my_encoder" / "1")


def test_readme_checkpoint_example_runs_and_resumes(tmp_path):
    """The README's checkpoint snippet after its Python example: trains epochs 3–4
    with checkpoints; run again, it restores the last one and trains nothing."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    example = re.search(r"## Use it from Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    snippet = re.search(r"\*\*From Python\*\*.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "fit_with_checkpoints" in snippet
    script = example.replace("model.fit(dataset, epochs=3)", "model.fit(dataset, epochs=3, verbose=0)")
    outputs = []
    for _ in range(2):
        result = run_python(["-c", script + snippet], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout.strip().splitlines()[-1])
    steps = 1437 // 64
    saved = [4 * steps, 100, 5 * steps]  # epoch end 4, every_n_steps=100, epoch end 5; keep=3
    expected = "(5, 0) " + str([f"checkpoints/mine/ckpt-{step}" for step in saved])
    assert outputs == [expected, expected], outputs



@pytest.mark.heavy
def test_train_cli_on_real_fashion_mnist(tmp_path):
    """One epoch of EMC² on the 60k Fashion-MNIST images from Debian's package.

    Bug caught: a run on real data that does not train (its objective must drop
    well below the untrained encoder's; the former `1-NN > 0.7` held untrained)."""
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.fail("apt-get install dataset-fashion-mnist first")
    import numpy as np
    import tensorflow as tf
    from absl import flags

    import emc2_tf
    from trainers.common import build_run
    from trainers.run_flags import define_train_flags

    args = ["--dataset=fashion_mnist", "--epochs=1", "--batch_size=256", "--eval_every=0",
            f"--export_dir={tmp_path}", "--tensorboard_dir=", "--checkpoint_dir="]
    result = run_python(["-m", "trainers.train", *args], cwd=ROOT, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    # Not the accuracy: the untrained encoder (same seed) already has held-out
    # 1-NN 0.777 and probe 0.796 here, and one epoch of EMC² measured 0.748 /
    # 0.794. What one epoch does move is EMC²'s objective: the exact global
    # contrastive loss of the first 5000 training images (the trainer skips it
    # above N = 20000) measured 8.93 untrained, 3.67 trained.
    run_flags = flags.FlagValues()
    define_train_flags(run_flags)
    run_flags(["train", *args])
    run = build_run("train", run_flags)  # the run's initial weights
    images = emc2_tf.data.batch.as_float_images(run.data.train_images[:5000]).numpy()
    served = tf.saved_model.load(summary["export_path"]).signatures["serving_default"]
    trained = np.concatenate([served(images=tf.constant(images[start:start + 500]))["embedding"]
                              for start in range(0, len(images), 500)])
    untrained = run.encoder.predict(images, batch_size=500, verbose=0)
    before, after = (float(emc2_tf.global_contrastive_loss(z, z, summary["temperature"]))
                     for z in (untrained, trained))
    assert after < before - 2.0, (before, after, summary)


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
