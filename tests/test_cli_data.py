"""The trainer's data flags (issue 18): `--dataset=folder`, held-out data, TFDS
split expressions, `--resume` on changed images, and every bad data input.

The images are written in the tests (PNG folders of scikit-learn's digits, a
fake STL-10 stored with TFDS' real `stl10` builder name); nothing is
downloaded.
"""

import os
import shutil
import sys

import numpy as np
import pytest

import emc2_tf
from fake_data import store_tfds, tfds_examples, write_png_folder
from helpers import ROOT, parse_summary, run_python

#: Flags of every run here: short, and nothing written but the checkpoints.
QUICK = ["--epochs=1", "--batch_size=16", "--tensorboard_dir=", "--export=false",
         "--eval_every=0"]

#: 30 digits per class: 300 images.
PER_CLASS = 30


def _digits_uint8():
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == c)[:PER_CLASS] for c in range(10)])
    keep.sort()
    images = np.round(digits.images[keep] * 255 / 16).astype(np.uint8)[..., None]
    return images, digits.target[keep]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """`{"labelled": one sub-folder per class, "flat": the same images unlabelled}`."""
    root = tmp_path_factory.mktemp("folders")
    images, labels = _digits_uint8()
    return {"labelled": write_png_folder(root / "labelled", images, labels),
            "flat": write_png_folder(root / "flat", images)}


def _train(*args, cwd=ROOT):
    return run_python(["-m", "trainers.train", *QUICK, *args], cwd=cwd)


def _one_line_error(result, *fragments):
    """The run failed with one `train: error:` line holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_folder_run_holds_out_a_fixed_share_and_resumes_bit_identically(folders, tmp_path):
    """Catches: the held-out share of a labelled folder not taken from training
    (train_size must be 300 − 30, 27 per class), `--resume` through a folder
    source not continuing bit for bit (1 + 1 epochs must equal 2 epochs: same
    state digest), and `--resume` accepting a folder whose file list changed (a
    file added: N differs; a file rewritten with another size: same N). Each
    refusal is one line, and writes no checkpoint."""
    data = ["--dataset=folder", f"--data_dir={folders['labelled']}"]
    whole = _train(*data, "--epochs=2", f"--checkpoint_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    summary = parse_summary(whole.stdout)
    assert summary["train_size"] == 10 * PER_CLASS - 30 and summary["held_out_size"] == 30
    assert summary["train_class_counts"] == {str(c): PER_CLASS - 3 for c in range(10)}
    assert summary["knn_accuracy"] > 0.5  # chance is 0.1: the held-out split is labelled
    # 1 + 1 epochs on a copy of the folder (the module's folder stays as it is);
    # then the copy changes and a third epoch is refused.
    changed = tmp_path / "changed"
    shutil.copytree(folders["labelled"], changed)
    run = tmp_path / "split"
    first = _train("--dataset=folder", f"--data_dir={changed}", f"--checkpoint_dir={run}")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _train("--resume", "--epochs=2", f"--checkpoint_dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert parse_summary(resumed.stdout)["state_digest"] == summary["state_digest"]

    files = sorted(os.listdir(run))
    shutil.copy(changed / "c3" / sorted(os.listdir(changed / "c3"))[0], changed / "c3" / "z.png")
    _one_line_error(_train("--resume", "--epochs=3", f"--checkpoint_dir={run}"),
                    "--resume: the training images of", "images=300 then, images=301 now",
                    "--overwrite")
    os.remove(changed / "c3" / "z.png")
    target = changed / "c5" / sorted(os.listdir(changed / "c5"))[0]
    with open(target, "ab") as stream:
        stream.write(b"\0" * 7)  # still decodes (data after IEND); 7 bytes longer
    _one_line_error(_train("--resume", "--epochs=3", f"--checkpoint_dir={run}"),
                    "the same N=270, but other files or sizes")
    assert sorted(os.listdir(run)) == files


def test_evaluate_reads_the_folder_it_is_given(folders, tmp_path):
    """Catches (audit) `evaluate --dataset=folder --data_dir=OTHER` silently
    scoring the run's own folder: the evaluation must name the other folder and
    hold out its 10 % (the 150 images of classes 0–4: 15)."""
    import json

    run = tmp_path / "ck"
    assert _train("--dataset=folder", f"--data_dir={folders['labelled']}",
                  f"--checkpoint_dir={run}").returncode == 0
    images, labels = _digits_uint8()
    half = labels < 5
    other = write_png_folder(tmp_path / "other", images[half], labels[half])
    result = run_python(["-m", "trainers.evaluate", f"--checkpoint_dir={run}",
                         "--dataset=folder", f"--data_dir={other}", "--nolinear_probe",
                         f"--output_json={tmp_path / 'eval.json'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["dataset"] == "other" and evaluation["held_out_size"] == 15


def test_an_unlabelled_folder_trains_without_evaluation_in_one_line(folders, tmp_path):
    """Catches a flat (unlabelled) folder crashing the run where it is evaluated
    (the 1-NN callback, the final scores, the projector) or training silently
    without saying that nothing is evaluated."""
    result = _train("--dataset=folder", f"--data_dir={folders['flat']}", "--eval_every=1",
                    "--projector", f"--checkpoint_dir={tmp_path / 'ck'}")
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stdout.splitlines() if line.startswith("no evaluation:")]
    assert said == ["no evaluation: the training images of flat have no labels (the 1-NN and "
                    "the linear probe need labelled training and held-out images; "
                    "--test_data_dir names a held-out folder)"]
    summary = parse_summary(result.stdout)
    assert summary["train_size"] == 10 * PER_CLASS and summary["knn_accuracy"] is None
    assert summary["held_out_size"] == 0
    assert summary["train_class_counts"] == {}


def test_a_separate_held_out_folder_is_read_at_the_training_size(folders, tmp_path):
    """Catches `--test_data_dir` ignored (the held-out images must be that folder's
    100, and all 300 training images kept) or read at its own size (12×12 files
    must be resized to the training images' 8×8)."""
    from PIL import Image

    images, labels = _digits_uint8()
    held_out = tmp_path / "held_out"
    for i in range(100):
        (held_out / f"c{labels[i * 3]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i * 3, :, :, 0]).resize((12, 12)).save(
            held_out / f"c{labels[i * 3]}" / f"{i}.png")
    data = emc2_tf.load_dataset("folder", folders["labelled"], test_data_dir=str(held_out))
    assert data.num_train == 300 and len(data.test_images) == 100
    assert data.test_images.image_shape == (8, 8, 1)
    result = _train("--dataset=folder", f"--data_dir={folders['labelled']}",
                    f"--test_data_dir={held_out}", f"--checkpoint_dir={tmp_path / 'ck'}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert summary["train_size"] == 300 and summary["held_out_size"] == 100


def test_the_held_out_share_is_stratified_fixed_and_disjoint():
    """Catches a held-out split that overlaps training, misses images, is not
    stratified (each class holds out round(0.1 · 30) = 3), or moves between calls
    or with NumPy's global seed (runs of different --seed must be evaluated on the
    same images)."""
    images, labels = _digits_uint8()
    source = emc2_tf.ArraySource(images, labels)
    np.random.seed(1)
    train, test = emc2_tf.holdout_split(source, 0.1)
    np.random.seed(2)
    train_again, test_again = emc2_tf.holdout_split(source, 0.1)
    np.testing.assert_array_equal(test.indices, test_again.indices)
    np.testing.assert_array_equal(train.indices, train_again.indices)
    assert np.intersect1d(train.indices, test.indices).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train.indices, test.indices])),
                                  np.arange(len(images)))
    assert np.bincount(test.labels).tolist() == [3] * 10
    np.testing.assert_array_equal(test.labels, labels[test.indices])
    with pytest.raises(ValueError, match=r"test_fraction \(--test_fraction\) must be in"):
        emc2_tf.holdout_split(source, 1.0)


def test_images_without_label_are_left_out_of_evaluation():
    """Catches evaluation counting TFDS' "no label" (-1, STL-10's unlabelled split
    inside train+unlabelled) as a class: the 1-NN and probe must score as on the
    labelled images alone (a -1 neighbour would vote for the last class), for
    arrays and for sources."""
    import keras

    rng = np.random.default_rng(0)
    train = rng.uniform(size=(60, 4, 4, 1)).astype(np.float32)
    test = rng.uniform(size=(20, 4, 4, 1)).astype(np.float32)
    train_labels = rng.integers(0, 3, 60)
    train_labels[::2] = -1
    test_labels = rng.integers(0, 3, 20)
    keras.utils.set_random_seed(0)
    encoder = emc2_tf.build_encoder("small_cnn", (4, 4, 1))
    labelled = train_labels >= 0
    expected = emc2_tf.evaluate_encoder(encoder, emc2_tf.from_arrays(
        train[labelled], train_labels[labelled], test, test_labels))
    with_unlabelled = emc2_tf.from_arrays(train, train_labels, test, test_labels)
    assert emc2_tf.evaluate_encoder(encoder, with_unlabelled) == expected
    sources = emc2_tf.from_sources(emc2_tf.ArraySource(train, train_labels),
                                   emc2_tf.ArraySource(test, test_labels))
    assert emc2_tf.evaluate_encoder(encoder, sources) == expected


@pytest.fixture(scope="module")
def stl10_dir(tmp_path_factory):
    """A fake STL-10 (TFDS' `stl10` builder: 96×96 RGB), train 12 labelled,
    unlabelled 8 (label -1), test 8; prepared as ArrayRecord."""
    data_dir = tmp_path_factory.mktemp("tfds")
    store_tfds(data_dir, "stl10", {
        split: tfds_examples(count, (96, 96, 3), split != "unlabelled", seed)
        for seed, (split, count) in enumerate({"train": 12, "test": 8, "unlabelled": 8}.items())
    }, file_format="array_record")
    return str(data_dir)


def test_tfds_split_expressions_train_as_the_paper_does(stl10_dir, tmp_path):
    """Catches `--train_split` not reaching TFDS (train+unlabelled must give 20
    training images, 8 of them without label), `--test_split` not reaching it (the
    8 test images must be scored, not the training split), the unlabelled ones
    crashing evaluation, and a split
    that does not exist failing with more than one line or without naming the
    splits there are."""
    data = ["--dataset=stl10", f"--data_dir={stl10_dir}", "--encoder=small_cnn",
            "--batch_size=4", "--test_split=test"]
    result = _train(*data, "--train_split=train+unlabelled", f"--checkpoint_dir={tmp_path / 'a'}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert summary["train_size"] == 20 and summary["train_class_counts"]["-1"] == 8
    assert summary["knn_accuracy"] is not None and summary["held_out_size"] == 8
    missing = _train(*data, "--train_split=train+unlabeled", f"--checkpoint_dir={tmp_path / 'b'}")
    _one_line_error(missing, "--dataset=stl10", "unlabeled", "unlabelled")
    assert not os.path.exists(tmp_path / "b")


def _write_bad_folders(root, folders):
    """The bad folders: `{case: folder}`."""
    corrupt = root / "corrupt"
    shutil.copytree(folders["labelled"], corrupt)
    victim = corrupt / "c4" / sorted(os.listdir(corrupt / "c4"))[2]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated: no end marker
    (root / "empty").mkdir()
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.txt").write_text("not an image")
    empty_class = root / "empty_class"
    shutil.copytree(folders["labelled"], empty_class)
    (empty_class / "c9_extra").mkdir()
    return {"corrupt": (corrupt, victim), "empty": root / "empty",
            "no_images": root / "no_images", "empty_class": empty_class}


# Two halves of the cases (14 trainer processes in all), so that pytest-xdist can
# run them on two workers.
@pytest.mark.parametrize("half", [0, 1])
def test_every_bad_data_input_is_one_line_naming_it_and_writes_nothing(half, folders,
                                                                       tmp_path):
    """Catches any bad data input reaching a TensorFlow stack trace, failing
    without naming the file or flag, or leaving a checkpoint folder behind: a
    corrupt file (named, with --skip_corrupt offered; with it the file is skipped
    and counted), an empty folder, a folder without image files, a class folder
    without images, a missing folder, --image_size that is not positive, data
    flags the data set does not use, --dataset=folder without --data_dir,
    --test_fraction beside --test_data_dir or leaving fewer training images than
    classes (the advice must be to lower it), and --jit_compile with a
    re-encoding EMC² on files (refused before anything is written; it failed
    inside fit with a stack trace, after flags.txt was written)."""
    bad = _write_bad_folders(tmp_path, folders)
    corrupt, victim = bad["corrupt"]
    ck = tmp_path / "ck"
    folder = ["--dataset=folder", f"--checkpoint_dir={ck}"]
    cases = [
        ([f"--data_dir={corrupt}"], [f"image file {victim} is unreadable or corrupt",
                                     "--skip_corrupt"]),
        ([f"--data_dir={bad['empty']}"], [f"image folder {bad['empty']} holds no image files"]),
        ([f"--data_dir={bad['no_images']}"], [f"{bad['no_images']} holds no image files"]),
        ([f"--data_dir={bad['empty_class']}"], [
            f"class folder {bad['empty_class'] / 'c9_extra'} holds no image files"]),
        ([f"--data_dir={tmp_path / 'nowhere'}"], [f"{tmp_path / 'nowhere'} does not exist"]),
        ([f"--data_dir={folders['labelled']}", "--image_size=0"],
         ["--image_size must be a positive number of pixels"]),
        ([f"--data_dir={folders['labelled']}", "--image_size=-3"],
         ["--image_size must be a positive number of pixels"]),
        ([f"--data_dir={folders['labelled']}", "--train_split=train+unlabelled"],
         ["--train_split=train+unlabelled has no effect with --dataset=folder"]),
        ([f"--data_dir={folders['labelled']}", f"--test_data_dir={folders['labelled']}",
          "--test_fraction=0.2"], ["--test_fraction=0.2 has no effect with --test_data_dir"]),
        ([], ["--dataset=folder needs --data_dir=DIR"]),
        ([f"--data_dir={folders['labelled']}", "--jit_compile", "--out_of_batch=reencode"],
         ["--jit_compile cannot re-encode stored negatives read from --dataset=folder"]),
        ([f"--data_dir={folders['labelled']}", "--test_fraction=0.99"],
         ["the training share would hold fewer images than the 10 classes; lower it"]),
    ]
    for args, fragments in cases[half::2]:
        result = _train(*folder, *args)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        for fragment in fragments:
            assert fragment in result.stderr, (args, result.stderr[-2000:])
        assert not os.path.exists(ck), args
    if half == 1:  # the two runs below go with the lighter half
        return
    digits = _train("--dataset=digits", "--skip_corrupt", f"--checkpoint_dir={ck}")
    _one_line_error(digits, "--skip_corrupt=True has no effect with --dataset=digits")
    skipped = _train(*folder, f"--data_dir={corrupt}", "--skip_corrupt")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert (f"train: skipped 1 unreadable image file(s) in {corrupt}: "
            f"c4/{victim.name}.") in skipped.stderr
    assert parse_summary(skipped.stdout)["train_size"] == 10 * PER_CLASS - 1 - 30


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
