"""TFDSSource (issue 18): a TFDS split read by index from ArrayRecord files.

Offline: the data sets are written in the test (a fake STL-10 with TFDS' real
`stl10` builder and splits, small ad-hoc ones, a local builder whose "download"
is a generator) or mocked (`tfds.testing.mock_data`); nothing is downloaded.
"""

import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from emc2_tf.data.folder import ImageFolderSource
from emc2_tf.data.tfds_source import NO_LABEL, TFDSSource, _import_tfds, prepare_tfds
from fake_data import store_tfds, tfds_examples
from helpers import run_python

tfds = _import_tfds()

STL10_SPLITS = {"train": 6, "test": 4, "unlabelled": 5}


def _one_line_error(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


_examples = tfds_examples
_store = store_tfds


def _tfds_load(name, split, data_dir):
    """The split as `tfds.load` streams it from TFRecord (no shuffling): the order
    and pixels a by-index source must reproduce."""
    examples = list(tfds.as_numpy(tfds.load(name, split=split, data_dir=str(data_dir),
                                            shuffle_files=False, download=False)))
    return (np.stack([e["image"] for e in examples]),
            np.array([e["label"] for e in examples], np.int64))


@pytest.fixture(scope="module")
def stl10_dir(tmp_path_factory):
    """A fake STL-10 (TFDS' `stl10` builder, version 1.0.0: 96x96 RGB, splits train,
    test and unlabelled with label -1), prepared as TFRecord, then converted by
    `prepare_tfds` (ArrayRecord files next to the TFRecord ones)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    _store(data_dir, "stl10", {
        split: _examples(count, (96, 96, 3), split != "unlabelled", seed)
        for seed, (split, count) in enumerate(STL10_SPLITS.items())})
    assert prepare_tfds("stl10", str(data_dir), download=False).endswith("stl10/1.0.0")
    return str(data_dir)


def _read(source, index):
    return source.read(tf.constant(index, tf.int64)).numpy()


def test_stl10_split_expressions_read_what_tfds_load_streams(stl10_dir):
    """Catches a source that reads another order or other pixels than
    `tfds.load(split, shuffle_files=False)` (the in-memory loader's order), that
    ignores a split expression (`train+unlabelled`, slices), drops or relabels
    STL-10's unlabelled examples (-1 kept; an all-unlabelled split has no labels),
    converts uint8, or whose fingerprint ignores the split; and a `read` that
    breaks inside a parallel tf.data map (iter_batches)."""
    source = TFDSSource("stl10", split="train+unlabelled", data_dir=stl10_dir)
    images, labels = _tfds_load("stl10", "train+unlabelled", stl10_dir)
    assert (source.num_images, source.image_shape, source.dtype) == (11, (96, 96, 3), tf.uint8)
    assert source.num_classes == 10 and source.version == "1.0.0"
    index = [10, 0, 7, 3, 3, 5]
    rows = _read(source, index)
    assert rows.dtype == np.uint8
    np.testing.assert_array_equal(rows, images[index])
    np.testing.assert_array_equal(source.labels, labels)
    assert source.labels.dtype == np.int64
    assert (source.labels[6:] == NO_LABEL).all() and (source.labels[:6] >= 0).all()
    batches = np.concatenate([batch.numpy() for batch in source.iter_batches(4)])
    np.testing.assert_array_equal(batches, images.astype(np.float32) / np.float32(255.0))

    for split, count in [("test", 4), ("train[:50%]", 3), ("train[-2:]+test[:1]", 3)]:
        part = TFDSSource("stl10", split=split, data_dir=stl10_dir)
        part_images, part_labels = _tfds_load("stl10", split, stl10_dir)
        assert part.num_images == count == len(part_images)
        np.testing.assert_array_equal(_read(part, list(range(count))), part_images)
        np.testing.assert_array_equal(part.labels, part_labels)
    assert TFDSSource("stl10", split="unlabelled", data_dir=stl10_dir).labels is None
    assert TFDSSource("stl10", split="train", data_dir=stl10_dir, label_key=None).labels is None

    same_count = [TFDSSource("stl10", split=s, data_dir=stl10_dir) for s in ("test", "train[:4]")]
    assert [s.num_images for s in same_count] == [4, 4]
    assert same_count[0].fingerprint() != same_count[1].fingerprint()
    assert source.fingerprint() == TFDSSource("stl10", "train+unlabelled",
                                              data_dir=stl10_dir).fingerprint()
    for bad in ([11], [-1]):
        with pytest.raises((IndexError, tf.errors.InvalidArgumentError), match="out of range"):
            _read(source, bad)


def test_bad_name_split_key_and_unprepared_data_are_one_line(stl10_dir, tmp_path):
    """Catches a raw TFDS error (or its whole catalogue) for: an unknown name; a
    split that does not exist (STL-10's is 'unlabelled', not 'unlabeled': named
    with the available splits), that cannot be parsed, or selects nothing; a
    missing image or label key (the features named); a data set not prepared in
    data_dir without download (how to prepare it); a bad image_size."""
    message = _one_line_error(lambda: TFDSSource("stl11", data_dir=stl10_dir))
    assert message.startswith("name='stl11'") and "stl10" in message and len(message) < 300

    message = _one_line_error(lambda: TFDSSource("stl10", "train+unlabeled",
                                                 data_dir=stl10_dir))
    assert message.startswith("split='train+unlabeled'")
    assert "train (6), test (4), unlabelled (5)" in message
    assert "did you mean 'unlabelled' for 'unlabeled'?" in message
    for split, reason in [("train[5:2]", "selects no example"), ("train[:200%]", "parsing"),
                          ("validation", "Unknown split")]:
        message = _one_line_error(lambda: TFDSSource("stl10", split, data_dir=stl10_dir))
        assert message.startswith(f"split={split!r}") and reason in message, message

    for key in ("image_key", "label_key"):
        message = _one_line_error(lambda: TFDSSource("stl10", data_dir=stl10_dir,
                                                     **{key: "pixels"}))
        assert message == (f"{key}='pixels' is not a feature of TFDS data set 'stl10': its "
                           "features are image, label.")

    empty = str(tmp_path / "empty")
    message = _one_line_error(lambda: TFDSSource("stl10", data_dir=empty))
    assert "not prepared in" in message and "download=True (--download)" in message
    assert f"`python -m emc2_tf.data.tfds_prepare stl10 --data_dir={empty}`" in message
    assert not os.path.exists(empty)  # nothing written, nothing downloaded

    message = _one_line_error(lambda: TFDSSource("stl10", data_dir=stl10_dir, image_size=0))
    assert message.startswith("image_size must be a positive integer")


def test_tfrecord_is_refused_with_the_command_that_converts_it(tmp_path):
    """Catches a TFRecord-only data set read another way than by index (or a raw
    NotImplementedError), and a printed conversion command that does not work:
    the command from the message is run as printed, then the source reads the
    split exactly as tfds.load streams it from the TFRecord files."""
    _store(tmp_path, "emc2_tiny_tfrecord", {"train": _examples(12, (8, 8, 3), True, 7)},
           shape=(8, 8, 3))
    message = _one_line_error(lambda: TFDSSource("emc2_tiny_tfrecord", data_dir=str(tmp_path)))
    assert "stored as TFRecord" in message
    command = re.search(r"`python (-m emc2_tf\.data\.tfds_prepare [^`]+)`", message).group(1)
    assert command == f"-m emc2_tf.data.tfds_prepare emc2_tiny_tfrecord --data_dir={tmp_path}"
    done = run_python(command.split())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "readable by index (ArrayRecord)" in done.stdout

    source = TFDSSource("emc2_tiny_tfrecord", data_dir=str(tmp_path))
    images, labels = _tfds_load("emc2_tiny_tfrecord", "train", tmp_path)
    np.testing.assert_array_equal(_read(source, list(range(12))[::-1]), images[::-1])
    np.testing.assert_array_equal(source.labels, labels)


def test_image_size_resizes_exactly_like_image_folders(stl10_dir, tmp_path):
    """Catches a resize other than ImageFolderSource's (same pixels for the same
    images, bit for bit), grey images given 3 channels, and images of varying
    size accepted without image_size (refused in one line); an image already of
    the size asked comes back unchanged."""
    sizes = [(5, 7), (8, 8), (3, 4), (6, 6)]
    rng = np.random.default_rng(3)
    grey = [rng.integers(0, 256, (h, w, 1), dtype=np.uint8) for h, w in sizes]
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 1))})
    tfds.dataset_builders.store_as_tfds_dataset(
        "emc2_varying_grey", "1.0.0", features,
        {"train": [(i, {"image": image}) for i, image in enumerate(grey)]},
        data_dir=str(tmp_path), file_format="array_record", disable_shuffling=True)
    message = _one_line_error(lambda: TFDSSource("emc2_varying_grey", data_dir=str(tmp_path),
                                                 label_key=None))
    assert "varying size" in message and "image_size (--image_size)" in message

    source = TFDSSource("emc2_varying_grey", data_dir=str(tmp_path), label_key=None,
                        image_size=(6, 6))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(grey):
        Image.fromarray(image[..., 0]).save(folder / f"{i}.png")
    expected = _read(ImageFolderSource(str(folder), image_size=(6, 6), channels=1), [2, 0, 1])
    assert expected.shape == (3, 6, 6, 1)
    np.testing.assert_array_equal(_read(source, [2, 0, 1]), expected)
    np.testing.assert_array_equal(_read(source, [3])[0], grey[3])  # already 6x6

    smaller = TFDSSource("stl10", "test", data_dir=stl10_dir, image_size=32)
    full = TFDSSource("stl10", "test", data_dir=stl10_dir)
    assert smaller.image_shape == (32, 32, 3)
    for i in range(full.num_images):
        Image.fromarray(_read(full, [i])[0]).save(folder / f"rgb_{i}.png")
    rgb = ImageFolderSource(str(folder), image_size=32, channels=3)
    rgb_index = [rgb.files.index(f"rgb_{i}.png") for i in range(full.num_images)]
    np.testing.assert_array_equal(_read(smaller, [0, 1, 2, 3]), _read(rgb, rgb_index))


def _offline_builder_name() -> str:
    """A registered TFDS builder whose 'download' is a generator (no network):
    5 images of 6x5 RGB in generation order. Registered once per process (the
    test file also runs as a script under Bazel, which imports it twice)."""
    name = "emc2_offline_images"
    try:
        tfds.builder_cls(name)
        return name
    except tfds.core.registered.DatasetNotFoundError:
        pass

    class Emc2OfflineImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(6, 5, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3)}),
                disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield i, {"image": _offline_image(i), "label": i % 3}

    assert Emc2OfflineImages.name == name
    return name


def _offline_image(i):
    return np.random.default_rng(100 + i).integers(0, 256, (6, 5, 3), dtype=np.uint8)


def test_download_prepares_array_record(tmp_path):
    """Catches download=True preparing TFRecord (TFDS' default: then unreadable by
    index) or not preparing at all, and download=False fetching anything."""
    name = _offline_builder_name()
    _one_line_error(lambda: TFDSSource(name, data_dir=str(tmp_path), download=False))
    assert not os.listdir(tmp_path)
    source = TFDSSource(name, data_dir=str(tmp_path), download=True)
    shards = sorted(os.listdir(tmp_path / name / "1.0.0"))
    assert any(".array_record-" in shard for shard in shards), shards
    assert not any(".tfrecord-" in shard for shard in shards), shards
    np.testing.assert_array_equal(_read(source, [4, 0, 2]),
                                  np.stack([_offline_image(i) for i in (4, 0, 2)]))
    np.testing.assert_array_equal(source.labels, [0, 1, 2, 0, 1])
    assert source.num_classes == 3


def test_mock_data_stl10_and_cifar10_through_data_sources():
    """Catches a source that does not go through `tfds.data_source`'s data sources
    (what `tfds.testing.mock_data` replaces), reads other records than asked,
    takes another image shape than the builder's (STL-10 96x96, CIFAR-10 32x32),
    or labels that are not the records' own; and TFDS 4.9.10's missing
    `importlib_resources` (a builder's code_path needs it) not stood in for."""
    assert tfds.builder("stl10").code_path is not None  # ModuleNotFoundError without it
    with tfds.testing.mock_data(num_examples=9):
        for name, split, shape in [("stl10", "train+unlabelled", (96, 96, 3)),
                                   ("cifar10", "test", (32, 32, 3))]:
            # mock_data's download is a no-op: download=True "prepares" the mock.
            source = TFDSSource(name, split=split, download=True)
            records = tfds.data_source(name, split=split)
            assert (source.num_images, source.image_shape) == (9, shape)
            assert source.num_classes == 10
            index = [8, 0, 4, 4]
            np.testing.assert_array_equal(_read(source, index),
                                          np.stack([records[i]["image"] for i in index]))
            np.testing.assert_array_equal(source.labels, [records[i]["label"] for i in range(9)])


def test_a_record_that_cannot_be_read_is_one_line_naming_it(stl10_dir):
    """Catches (audit) a damaged or missing ArrayRecord shard surfacing as a
    35-line TensorFlow error while reading (evaluation, fit) or a raw
    RuntimeError while reading the labels: each is one line naming the data set,
    the split, the record, and the command that prepares it again."""
    import emc2_tf
    from emc2_tf.evaluation import float_batches

    source = TFDSSource("stl10", split="test", data_dir=stl10_dir)

    class Damaged:
        def __init__(self, records):
            self.records = records

        def __len__(self):
            return len(self.records)

        def __getitem__(self, i):
            if i == 2:
                raise RuntimeError("ArrayRecord file should be at least 64KB big\nmore")
            return self.records[i]

    source._data_source = Damaged(source._data_source)
    with pytest.raises(emc2_tf.SourceReadError) as error:
        list(float_batches(source, 2))
    assert str(error.value) == (
        "TFDS data set 'stl10' split 'test': record 2 cannot be read (ArrayRecord file should "
        "be at least 64KB big): its files are damaged or changed; prepare it again with "
        f"`python -m emc2_tf.data.tfds_prepare stl10 --data_dir={stl10_dir}`.")
    other = TFDSSource("stl10", split="train", data_dir=stl10_dir)
    assert other.read_error(RuntimeError(str(error.value))) is None  # not its record

    labels = TFDSSource("stl10", split="test", data_dir=stl10_dir)
    labels._open = lambda builder, decoders: Damaged([{"label": 1}] * 4)
    message = _one_line_error(lambda: labels.labels)
    assert message.startswith("TFDS data set 'stl10' split 'test' cannot be read (RuntimeError: "
                              "ArrayRecord file should be at least 64KB big)")


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
