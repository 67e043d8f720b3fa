"""The command line and the README's Python example, run for real."""

import os
import re

import pytest

from helpers import ROOT, parse_summary, run_python


def test_train_cli_trains_evaluates_and_exports(tmp_path):
    result = run_python(["-m", "trainers.train", "--epochs=2", "--batch_size=32", "--eval_every=1",
                   f"--export_dir={tmp_path / 'sm'}", f"--tensorboard_dir={tmp_path / 'tb'}",
                   "--temperature=0.1", f"--checkpoint_dir={tmp_path / 'ck'}"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert summary["knn_accuracy"] > 0.8 and summary["linear_probe_accuracy"] > 0.8
    assert 0.0 < summary["acceptance_rate"] < 1.0
    assert summary["export_path"] == str(tmp_path / "sm" / "emc2" / "1")
    assert os.path.isfile(os.path.join(summary["export_path"], "saved_model.pb"))
    assert "held-out 1-NN accuracy" in result.stdout
    assert os.listdir(tmp_path / "tb" / "emc2")  # TensorBoard event files
    assert sorted(os.listdir(tmp_path / "ck")) == [
        "checkpoint", "ckpt-44.data-00000-of-00001", "ckpt-44.index", "ckpt-88.data-00000-of-00001",
        "ckpt-88.index", "flags.txt"]


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
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    example = re.search(r"## Use it from Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert "emc2_tf.EMC2Model(" in example and "model.fit(" in example
    result = run_python(["-c", example], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = re.search(r"'knn_accuracy': ([0-9.]+)", result.stdout)
    assert accuracy and float(accuracy.group(1)) > 0.8
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
    """One epoch of EMC² on the 60k Fashion-MNIST images from Debian's package."""
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.fail("apt-get install dataset-fashion-mnist first")
    result = run_python(["-m", "trainers.train", "--dataset=fashion_mnist", "--epochs=1",
                   "--batch_size=256", "--eval_every=0", f"--export_dir={tmp_path}",
                   "--tensorboard_dir=", "--checkpoint_dir="], cwd=ROOT, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert summary["knn_accuracy"] > 0.7, summary  # 10 classes: chance is 0.1


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
