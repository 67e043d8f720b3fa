"""The trainer's finite-augmentation flags: `--finite_augmentations` and `--gradient_error_every`."""

import numpy as np
import pytest

from helpers import parse_summary, run_python


def test_gradient_error_every_logs_the_exact_objective(tmp_path):
    """Catches: `--finite_augmentations` / `--gradient_error_every` parsed but not wired
    (no stored views, no monitor: no `global_objective` in the summary, no
    `global/*` TensorBoard scalars), or measured at other steps than every n."""
    import emc2_tf

    result = run_python(["-m", "trainers.train", "--method=simclr", "--dataset=digits",
                         "--train_size=100", "--batch_size=10", "--epochs=2",
                         "--finite_augmentations=2", "--gradient_error_every=4",
                         "--optimizer=sgd", "--eval_every=0", "--export=false",
                         f"--checkpoint_dir={tmp_path / 'ck'}",
                         f"--tensorboard_dir={tmp_path / 'tb'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    objective = summary["global_objective"]
    assert objective["step"] == 16  # 20 steps, measured at 0, 4, …, 16
    assert objective["gradient_norm"] > 0 and objective["gradient_error"] > 0
    assert 0 < objective["global_loss"] < np.log(200)  # F ≤ log(1 + N·K − K) at worst
    scalars = emc2_tf.read_scalars(str(tmp_path / "tb" / "simclr"))
    assert [step for step, _ in scalars["global/gradient_norm"]] == [0, 4, 8, 12, 16]
    assert scalars["global/loss"][-1][1] == pytest.approx(objective["global_loss"], rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--finite_augmentations=1"], "--finite_augmentations must be 0 (off) or an integer ≥ 2"),
    (["--gradient_error_every=5"], "--gradient_error_every needs --finite_augmentations=K"),
    (["--finite_augmentations=2", "--gradient_error_every=-1"],
     "--gradient_error_every must be ≥ 0"),
])
def test_finite_flags_are_refused_in_one_line(tmp_path, flags, message):
    """Catches: a K < 2 or a gradient-error interval without stored views reaching
    the library (a stack trace, or a run that silently measures nothing)."""
    result = run_python(["-m", "trainers.train", "--dataset=digits", "--epochs=1", *flags],
                        cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("train:")]
    assert ours == [result.stderr.strip().splitlines()[-1]] and len(ours) == 1, result.stderr


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
