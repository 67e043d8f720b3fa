"""The training recipe: LARS, the warm-up + cosine schedule, `build_optimizer`,
`subset_train`, and the CLI/benchmark flags that use them (issue 11, part 3).

Every number is checked against a float64 NumPy transcription of the
formula in `emc2_tf/optimizers.py` (SimCLR's LARS; Keras' CosineDecay with
warm-up), never just "it ran".
"""

import json
import math
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from emc2_tf.optimizers import LARS, AdamL2, SGDL2, build_optimizer, learning_rate_schedule
from helpers import parse_summary, run_python


# --------------------------------------------------------------------------- LARS


def _lars_reference(w, grads, lrs, momentum, weight_decay, eta, adapted, nesterov=False):
    """SimCLR's LARS in float64: returns (w, v) after applying `grads` with `lrs`."""
    w = np.array(w, np.float64)
    v = np.zeros_like(w)
    for g, lr in zip(grads, lrs):
        g = np.array(g, np.float64)
        trust = 1.0
        if adapted:
            g = g + weight_decay * w
            w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
            trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
        v = momentum * v + lr * trust * g
        w = w - (momentum * v + lr * trust * g if nesterov else v)
    return w, v


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_float64_reference(nesterov):
    """Catches a wrong LARS update: trust ratio (η‖w‖/‖g‖ after weight decay),
    weight decay on biases or excluded kernels, the learning rate outside the
    velocity (the other momentum form differs under a changing learning rate),
    or a wrong Nesterov step."""
    rng = np.random.default_rng(0)
    initial = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,)),
               "head_kernel": rng.normal(size=(4, 2))}
    variables = {name: keras.Variable(value.astype(np.float32), name=name)
                 for name, value in initial.items()}
    steps = 5
    grads = [{name: rng.normal(size=value.shape) for name, value in initial.items()}
             for _ in range(steps)]
    # A changing learning rate 0.5 · 0.7^s: tells SimCLR's v ← m v + lr·t·g from v ← m v + t·g.
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.7)
    lrs = [0.5 * 0.7 ** s for s in range(steps)]
    optimizer = LARS(schedule, momentum=0.9, weight_decay=0.3, eta=0.05, nesterov=nesterov,
                     exclude_from_layer_adaptation=["head"])
    order = list(variables)
    for step in range(steps):
        optimizer.apply_gradients(
            [(tf.constant(grads[step][n], tf.float32), variables[n]) for n in order])
    for name, adapted in (("kernel", True), ("bias", False), ("head_kernel", False)):
        expected_w, expected_v = _lars_reference(
            initial[name], [g[name] for g in grads], lrs, 0.9, 0.3, 0.05, adapted, nesterov)
        moved = np.asarray(variables[name]) - initial[name]
        np.testing.assert_allclose(moved, expected_w - initial[name], rtol=2e-5, atol=1e-6,
                                   err_msg=name)
        velocity = np.asarray(optimizer.momentums[order.index(name)])
        np.testing.assert_allclose(velocity, expected_v, rtol=2e-5, atol=1e-6, err_msg=name)
    # The kernel really was scaled: its trust ratio is far from 1 here.
    w0, g0 = initial["kernel"], grads[0]["kernel"] + 0.3 * initial["kernel"]
    assert 0.01 < 0.05 * np.linalg.norm(w0) / np.linalg.norm(g0) < 0.2
    assert int(optimizer.iterations.numpy()) == steps


def test_lars_zero_norms_give_trust_ratio_one_and_no_nan():
    """Catches a 0/0 or x/0 in the trust ratio: a zero kernel (‖w‖ = 0) or a
    zero gradient (‖g‖ = 0) must use trust ratio 1, not NaN or inf."""
    zero_kernel = keras.Variable(np.zeros((2, 3), np.float32), name="kernel")
    g = np.arange(6, dtype=np.float32).reshape(2, 3) / 5.0 + 0.1
    optimizer = LARS(0.1, momentum=0.9, weight_decay=0.5, eta=0.001)
    optimizer.apply_gradients([(tf.constant(g), zero_kernel)])
    # ‖w‖ = 0: w ← 0 − lr·1·(g + wd·0)
    np.testing.assert_allclose(np.asarray(zero_kernel), -0.1 * g, rtol=1e-6)

    kernel = keras.Variable(np.ones((2, 3), np.float32), name="kernel")
    optimizer = LARS(0.1, momentum=0.9, weight_decay=0.0, eta=0.001)
    optimizer.apply_gradients([(tf.constant(g), kernel)])
    after_first = np.asarray(kernel).copy()
    velocity = np.asarray(optimizer.momentums[0]).copy()
    optimizer.apply_gradients([(tf.zeros((2, 3)), kernel)])  # ‖g‖ = 0: v ← m v, w ← w − v
    assert np.all(np.isfinite(np.asarray(kernel)))
    np.testing.assert_allclose(np.asarray(optimizer.momentums[0]), 0.9 * velocity, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(kernel), after_first - 0.9 * velocity, rtol=1e-6)
    trust = 0.001 * np.sqrt(6.0) / np.linalg.norm(g)  # the first step was scaled
    np.testing.assert_allclose(velocity, 0.1 * trust * g, rtol=1e-5)


def test_lars_serialises_with_its_hyper_parameters_and_schedule():
    """Catches a LARS that cannot be saved or reloaded (`get_config` missing an
    argument, not registered, or the base class' decoupled weight decay
    switched on by the round trip)."""
    schedule = learning_rate_schedule(0.3, total_steps=100, warmup_steps=10)
    optimizer = LARS(schedule, momentum=0.8, weight_decay=1e-4, eta=0.002, nesterov=True,
                     exclude_from_layer_adaptation=["head"])
    config = keras.optimizers.serialize(optimizer)
    assert config["registered_name"] == "emc2_tf>LARS"
    restored = keras.optimizers.deserialize(json.loads(json.dumps(config)))
    assert type(restored) is LARS
    assert (restored.momentum, restored.lars_weight_decay, restored.eta, restored.nesterov) == (
        0.8, 1e-4, 0.002, True)
    assert restored.exclude_from_layer_adaptation == ("head",)
    assert restored.weight_decay is None  # no extra decoupled decay
    assert restored.learning_rate.numpy() == pytest.approx(0.0)  # the schedule at step 0
    assert restored._learning_rate.get_config() == schedule.get_config()
    for name, cls in (("adam", AdamL2), ("sgd", SGDL2)):
        l2 = build_optimizer(name, 0.01, weight_decay=3e-4)
        again = keras.optimizers.deserialize(keras.optimizers.serialize(l2))
        assert type(again) is cls and again.l2 == 3e-4 and again.weight_decay is None


def _tiny_regression(optimizer):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(1)
    return model, rng.normal(size=(32, 5)).astype("f4"), rng.normal(size=(32, 1)).astype("f4")


def test_lars_with_schedule_resumes_from_a_checkpoint_exactly(tmp_path):
    """Catches state LARS forgets in a checkpoint (velocities, the step that
    drives the schedule): 1 epoch + checkpoint + restore + 1 epoch must equal
    2 uninterrupted epochs bit for bit (what `--resume` relies on)."""
    def recipe():
        return LARS(learning_rate_schedule(0.5, 8, 2), weight_decay=0.01, eta=0.05)

    full, x, y = _tiny_regression(recipe())
    full.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    first, x, y = _tiny_regression(recipe())
    first.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).write(str(tmp_path / "c"))

    resumed, x, y = _tiny_regression(recipe())
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(path).assert_consumed()
    assert int(resumed.optimizer.iterations.numpy()) == 4
    resumed.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    assert int(resumed.optimizer.iterations.numpy()) == 8
    for a, b in zip(full.weights, resumed.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(full.optimizer.momentums, resumed.optimizer.momentums):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(full.weights[0]), np.asarray(first.weights[0]))


MIRRORED_SCRIPT = r"""
import json, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
import emc2_tf

def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dense(1)])
        model.compile(loss="mse", optimizer=emc2_tf.build_optimizer(
            "lars", emc2_tf.learning_rate_schedule(0.5, 8, 2), weight_decay=0.01, eta=0.05))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 5)).astype("f4"), rng.normal(size=(32, 1)).astype("f4")
    initial = [np.asarray(w).copy() for w in model.weights]
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    copies = []
    for w in list(model.weights) + list(model.optimizer.momentums):
        inner = getattr(w, "_value", w)
        copies.append([np.asarray(v) for v in getattr(inner, "values", [inner])])
    return initial, copies, int(model.optimizer.iterations.numpy())

init1, one, steps1 = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
init2, two, steps2 = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(json.dumps({
    "replicas": [len(c) for c in two],
    "replicas_identical": all(np.array_equal(c[0], r) for c in two for r in c[1:]),
    "same_init": all(np.array_equal(a, b) for a, b in zip(init1, init2)),
    "max_diff": max(float(np.max(np.abs(a[0] - b[0]))) for a, b in zip(one, two)),
    "moved": min(float(np.max(np.abs(c[0] - i))) for c, i in zip(one, init1)),
    "steps": [steps1, steps2]}))
"""


def test_lars_under_mirrored_strategy_matches_one_device():
    """Catches LARS breaking under tf.distribute (the update receiving the
    per-replica tf.Variable, per-replica norms, replicas drifting apart):
    2 replicas must end equal to 1 device and identical to each other."""
    result = run_python(["-c", MIRRORED_SCRIPT], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same_init"] and report["steps"] == [8, 8]
    assert set(report["replicas"]) == {2} and report["replicas_identical"]
    assert report["moved"] > 1e-4  # every weight and velocity changed
    assert report["max_diff"] < 1e-5, report


# ------------------------------------------------------------------ the schedule


def _closed_form(step, base, total, warmup):
    step = min(step, total)
    if step < warmup:
        return base * step / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_learning_rate_schedule_values_against_closed_form():
    """Catches a wrong warm-up slope, a cosine that does not start at base_lr
    at the end of warm-up or does not reach 0 at total_steps, an off-by-one
    in the decay length, or a schedule that rises again after total_steps."""
    base, total, warmup = 0.3, 100, 10
    schedule = learning_rate_schedule(base, total, warmup)
    expected = {0: 0.0, 5: 0.15, 10: 0.3, 55: 0.15, 99: None, 100: 0.0, 250: 0.0}
    for step, value in expected.items():
        closed = _closed_form(step, base, total, warmup)
        if value is not None:
            assert closed == pytest.approx(value, abs=1e-12)
        assert float(schedule(step)) == pytest.approx(closed, rel=1e-6, abs=1e-8), step
    # The last update's rate (float32: 1 + cos is a cancellation, hence rel 1e-4).
    assert float(schedule(99)) == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * 89 / 90)),
                                                rel=1e-4)
    assert 0 < float(schedule(99)) < 1e-4
    # No warm-up: a plain cosine from base_lr.
    assert float(learning_rate_schedule(0.2, 10, 0)(0)) == pytest.approx(0.2)
    assert float(learning_rate_schedule(0.2, 10, 0)(5)) == pytest.approx(0.1)


@pytest.mark.parametrize("args, argument", [
    ((0.1, 10, 10), "warmup_steps"), ((0.1, 10, -1), "warmup_steps"),
    ((0.1, 0, 0), "total_steps"), ((0.0, 10, 2), "base_lr"), ((float("nan"), 10, 2), "base_lr"),
])
def test_learning_rate_schedule_rejects_bad_arguments(args, argument):
    """Catches a schedule silently built with no cosine phase, negative steps
    or a non-finite peak."""
    with pytest.raises(ValueError) as error:
        learning_rate_schedule(*args)
    message = str(error.value)
    assert message.startswith(argument) and "\n" not in message


def test_learning_rate_schedule_drives_model_fit():
    """Catches a schedule that `model.fit` does not follow (evaluated at the
    wrong step, or a constant rate used): a linear model with a constant
    gradient 1 must move by exactly −Σ_{s<7} lr(s), and the optimizer must
    report lr(7) after 7 steps."""
    base, total, warmup, steps, batch = 0.2, 12, 4, 7, 4
    schedule = learning_rate_schedule(base, total, warmup)
    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(optimizer=build_optimizer("sgd", schedule, momentum=0.0),
                  loss=lambda y_true, y_pred: y_pred[:, 0])  # d loss / d kernel = x = 1
    x = np.ones((steps * batch, 1), np.float32)
    model.fit(x, np.zeros_like(x), batch_size=batch, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == steps
    assert float(model.optimizer.learning_rate) == pytest.approx(
        _closed_form(steps, base, total, warmup), rel=1e-6)
    moved = float(np.asarray(model.weights[0])[0, 0])
    assert moved == pytest.approx(-sum(_closed_form(s, base, total, warmup)
                                       for s in range(steps)), rel=1e-6)


# ------------------------------------------------------------- build_optimizer


def test_build_optimizer_classes_and_hyper_parameters():
    """Catches a name mapped to the wrong optimizer or hyper-parameter (SGD
    without momentum 0.9, AdamW without its decay, LARS' η or decay lost, a
    schedule replaced by a constant)."""
    adam = build_optimizer("adam", 1e-3)
    assert type(adam) is keras.optimizers.Adam and adam.weight_decay is None
    assert float(adam.learning_rate) == pytest.approx(1e-3)
    adam_l2 = build_optimizer("adam", 1e-4, weight_decay=1e-4)
    assert type(adam_l2) is AdamL2 and adam_l2.l2 == 1e-4 and adam_l2.weight_decay is None
    adamw = build_optimizer("adamw", 2e-3, weight_decay=0.05)
    assert type(adamw) is keras.optimizers.AdamW and adamw.weight_decay == 0.05
    sgd = build_optimizer("sgd", 0.1)
    assert type(sgd) is keras.optimizers.SGD and sgd.momentum == 0.9 and not sgd.nesterov
    sgd_l2 = build_optimizer("sgd", 0.1, weight_decay=1e-4)
    assert type(sgd_l2) is SGDL2 and sgd_l2.momentum == 0.9 and sgd_l2.l2 == 1e-4
    lars = build_optimizer("lars", 4.8, weight_decay=1e-6)
    assert type(lars) is LARS
    assert (lars.momentum, lars.eta, lars.lars_weight_decay, lars.nesterov) == (
        0.9, 0.001, 1e-6, False)
    assert float(lars.learning_rate) == pytest.approx(4.8)
    schedule = learning_rate_schedule(0.3, 100, 10)
    assert build_optimizer("lars", schedule)._learning_rate is schedule
    assert emc2_tf.build_optimizer is build_optimizer and emc2_tf.LARS is LARS


def test_weight_decay_is_l2_for_adam_and_sgd_and_decoupled_for_adamw():
    """Catches `--weight_decay` meaning something else than documented: adam
    and sgd must equal the plain optimizer on g + wd·w (PyTorch's
    `weight_decay`, the authors' code), adamw must decay w by lr·wd·w
    outside the Adam step."""
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    for name, plain in (("adam", keras.optimizers.Adam(0.01)),
                        ("sgd", keras.optimizers.SGD(0.01, momentum=0.9))):
        a, b = keras.Variable(w0), keras.Variable(w0)
        with_l2 = build_optimizer(name, 0.01, weight_decay=0.5)
        for g in grads:
            with_l2.apply_gradients([(tf.constant(g), a)])
            plain.apply_gradients([(tf.constant(g + 0.5 * np.asarray(b)), b)])
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7,
                                   err_msg=name)
        assert not np.allclose(np.asarray(a), w0)
    w = keras.Variable(w0)
    build_optimizer("adamw", 0.01, weight_decay=0.5).apply_gradients([(tf.constant(grads[0]), w)])
    g = grads[0].astype(np.float64)
    adam_step = 0.01 * g * math.sqrt(0.001) / (math.sqrt(0.001) * np.abs(g) + 1e-7)
    np.testing.assert_allclose(np.asarray(w), w0 - 0.01 * 0.5 * w0 - adam_step,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, lr, wd, argument", [
    ("rmsprop", 1e-3, 0.0, "name"), ("LARS", 1e-3, 0.0, "name"),
    ("adam", float("nan"), 0.0, "learning_rate"), ("sgd", float("inf"), 0.0, "learning_rate"),
    ("adam", 0.0, 0.0, "learning_rate"), ("lars", -0.1, 0.0, "learning_rate"),
    ("adam", "fast", 0.0, "learning_rate"),
    ("adamw", 1e-3, -1e-4, "weight_decay"), ("lars", 1e-3, float("nan"), "weight_decay"),
    ("sgd", 1e-3, float("inf"), "weight_decay"),
])
def test_build_optimizer_rejects_bad_arguments_in_one_line(name, lr, wd, argument):
    """Catches an unknown name or a non-finite/negative rate or decay reaching
    Keras (which would train on NaN or silently ignore it)."""
    with pytest.raises(ValueError) as error:
        build_optimizer(name, lr, weight_decay=wd)
    message = str(error.value)
    assert message.startswith(f"{argument} must be") and "\n" not in message
    if argument == "name":
        assert "adam|adamw|sgd|lars" in message


# ----------------------------------------------------------------- subset_train


def test_subset_train_is_stratified_seeded_and_leaves_the_test_split():
    """Catches a subset that is not stratified (the first N images, or a plain
    random draw), ignores the seed, loses the label alignment, or touches the
    held-out split."""
    data = emc2_tf.load_digits()
    subset = emc2_tf.subset_train(data, 300, seed=0)
    assert type(subset) is type(data) and subset.num_train == 300
    full_counts = np.bincount(data.train_labels, minlength=10)
    counts = np.bincount(subset.train_labels, minlength=10)
    assert np.all(np.abs(counts - 300 * full_counts / data.num_train) < 1), counts
    # Each kept image keeps its own label, in the original order.
    rows = {img.tobytes(): i for i, img in enumerate(data.train_images)}
    kept = [rows[img.tobytes()] for img in subset.train_images]
    assert kept == sorted(kept)
    np.testing.assert_array_equal(data.train_labels[kept], subset.train_labels)
    assert subset.test_images is data.test_images and subset.test_labels is data.test_labels
    assert np.array_equal(emc2_tf.subset_train(data, 300, seed=0).train_images,
                          subset.train_images)
    assert not np.array_equal(emc2_tf.subset_train(data, 300, seed=1).train_images,
                              subset.train_images)
    assert emc2_tf.subset_train(data, 0) is data and emc2_tf.subset_train(data, 1437) is data
    assert emc2_tf.subset_train(data, 1433, seed=0).num_train == 1433  # < 10 left out
    for bad, text in ((5, "smaller than the 10 classes"), (1438, "must be in [0, 1437]"),
                      (-1, "must be in [0, 1437]"), (2.5, "must be an integer")):
        with pytest.raises(ValueError, match="train_size") as error:
            emc2_tf.subset_train(data, bad)
        assert text in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------- CLI, benchmarks

BATCH = 32


def test_cli_recipe_flags_train_a_stratified_subset_with_lars_and_warmup(tmp_path):
    """Catches the recipe flags not reaching the run: --train_size not applied
    (global_step would be 2·⌊1437/32⌋), not stratified, --optimizer/
    --warmup_epochs ignored (TensorBoard's learning rate would be constant),
    or missing from flags.txt so --resume would not keep them."""
    result = run_python([
        "-m", "trainers.train", "--train_size=300", "--optimizer=lars", "--warmup_epochs=1",
        "--weight_decay=1e-4", "--learning_rate=0.5", "--epochs=2", f"--batch_size={BATCH}",
        "--eval_every=0", "--export=false", "--log_every_steps=4",
        f"--checkpoint_dir={tmp_path / 'ck'}", f"--tensorboard_dir={tmp_path / 'tb'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    steps = 300 // BATCH
    assert summary["global_step"] == 2 * steps == 18
    assert summary["train_size"] == 300 and summary["optimizer"] == "lars"
    data = emc2_tf.load_digits()
    full = np.bincount(data.train_labels, minlength=10)
    counts = np.array([summary["train_class_counts"][str(c)] for c in range(10)])
    assert counts.sum() == 300 and np.all(np.abs(counts - 300 * full / data.num_train) < 1)
    assert np.array_equal(counts, np.bincount(emc2_tf.subset_train(data, 300, 0).train_labels))
    # Warm-up over epoch 1 (9 steps), cosine to 0 at step 18, read back from TensorBoard.
    scalars = emc2_tf.read_scalars(str(tmp_path / "tb" / "emc2"))
    logged = dict(scalars["step/learning_rate"])
    assert sorted(logged) == [4, 8, 12, 16]
    for step, value in logged.items():
        assert value == pytest.approx(_closed_form(step, 0.5, 2 * steps, steps), rel=1e-5), step
    assert dict(scalars["train/learning_rate"])[2 * steps] == pytest.approx(0.0, abs=1e-7)
    text = (tmp_path / "ck" / "flags.txt").read_text()
    for flag in ("--optimizer=lars", "--train_size=300", "--warmup_epochs=1",
                 "--weight_decay=0.0001"):
        assert flag in text.splitlines(), flag
    # --resume takes them from flags.txt and refuses a different value.
    resumed = run_python(["-m", "trainers.train", "--resume", "--optimizer=adam",
                          f"--checkpoint_dir={tmp_path / 'ck'}"])
    assert resumed.returncode == 2
    assert "--optimizer=adam differs from the run's --optimizer=lars" in resumed.stderr


@pytest.mark.parametrize("args, flag, message", [
    (["--optimizer=rmsprop"], "--optimizer", "value should be one of <adam|adamw|sgd|lars>"),
    (["--weight_decay=-1"], "--weight_decay", "--weight_decay must be finite and ≥ 0"),
    (["--weight_decay=nan"], "--weight_decay", "--weight_decay must be finite and ≥ 0"),
    (["--learning_rate=inf"], "--learning_rate", "--learning_rate must be finite and > 0"),
    (["--warmup_epochs=-1"], "--warmup_epochs", "--warmup_epochs must be ≥ 0"),
    (["--train_size=-5"], "--train_size", "--train_size must be ≥ 0"),
])
def test_recipe_flag_validators_name_the_flag(args, flag, message):
    """Catches a recipe flag accepted with a value the run cannot use (negative
    or NaN decay, infinite rate, negative sizes), or refused without naming
    the flag and what it accepts (in-process: the trainer's own parsers)."""
    from absl import flags

    from trainers.run_flags import define_train_flags

    values = flags.FlagValues()
    define_train_flags(values)
    with pytest.raises(flags.IllegalFlagValueError) as error:
        values(["train", *args])
    text = str(error.value)
    assert flag in text and message in text and "\n" not in text


@pytest.mark.parametrize("args, flag, message", [
    (["--weight_decay=-1"], "--weight_decay", "--weight_decay must be finite and ≥ 0"),
    (["--warmup_epochs=2", "--epochs=2"], "--warmup_epochs",
     "--warmup_epochs=2 must be < --epochs=2"),
    (["--train_size=5"], "--train_size", "smaller than the 10 classes"),
    (["--train_size=5000"], "--train_size", "train_size must be in [0, 1437]"),
])
def test_cli_rejects_bad_recipe_flags_in_one_line(tmp_path, args, flag, message):
    """Catches a bad recipe flag ending in a traceback, or in a message that
    does not name the flag and what it accepts, on the real command line
    (values only the data or --epochs can refute included)."""
    epochs = [] if any(arg.startswith("--epochs") for arg in args) else ["--epochs=2"]
    result = run_python(["-m", "trainers.train", *args, *epochs, "--eval_every=0",
                         f"--checkpoint_dir={tmp_path / 'ck'}", "--tensorboard_dir=",
                         "--export=false"])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if flag in line]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "ck").exists()  # refused before anything is written


def test_benchmark_quality_uses_the_recipe_flags(tmp_path):
    """Catches benchmarks/quality.py ignoring --train_size/--optimizer/
    --warmup_epochs (its JSON and its models must follow them)."""
    from benchmarks import common

    data = emc2_tf.subset_train(emc2_tf.load_digits(), 300, seed=0)
    _, model = common.build("simclr", data, BATCH, 0, optimizer="lars", learning_rate=0.5,
                            weight_decay=1e-4)
    assert type(model.optimizer) is LARS and model.optimizer.lars_weight_decay == 1e-4
    result = run_python(["-m", "benchmarks.quality", "--methods=simclr", f"--batch_sizes={BATCH}",
                         "--seeds=1", "--epochs=2", "--train_size=300", "--optimizer=sgd",
                         "--learning_rate=0.05", "--weight_decay=1e-4", "--warmup_epochs=1",
                         f"--results_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "quality.json").read_text())
    assert payload["num_train"] == 300
    assert (payload["optimizer"], payload["learning_rate"], payload["weight_decay"],
            payload["warmup_epochs"]) == ("sgd", 0.05, 1e-4, 1)
    run = payload["runs"][0]
    assert 0.5 < run["knn_accuracy"] <= 1
    # What the model really trained with: SGD + L2, the cosine ended at 0.
    assert run["optimizer"] == "SGDL2" and run["final_learning_rate"] == pytest.approx(0, abs=1e-7)
    bad = run_python(["-m", "benchmarks.quality", "--methods=simclr", "--weight_decay=-1"])
    assert bad.returncode == 2 and "--weight_decay must be a finite number ≥ 0" in bad.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
