"""Image sources (issue 18): `ArraySource` and `ImageFolderSource` read image i by
sample index, in the stored dtype, per batch; every test writes its own files."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from emc2_tf.data.folder import IMAGE_EXTENSIONS, ImageFolderSource
from emc2_tf.data.image_source import ArraySource


def _write(path, pixels, **options):
    """Saves uint8 `[H, W]`, `[H, W, 3]` or `[H, W, 4]` pixels with PIL (format from
    the extension) and returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path, **options)
    return str(path)


def _read(source, index):
    return source.read(tf.constant(index, tf.int64)).numpy()


def _random(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _one_line_error(kind, call):
    with pytest.raises(kind) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# -- ArraySource ----------------------------------------------------------------


def test_array_source_reads_exact_rows_in_stored_dtype_and_scales_per_batch():
    """Catches a read that returns other rows, converts the stored dtype (uint8 must
    stay uint8, digits' k/16 floats stay float), wraps a negative index silently
    (NumPy's take), or a to_float that is not exactly /255."""
    grey = _random((20, 5, 4))
    source = ArraySource(grey, labels=np.arange(20) % 3, name="grey")
    assert source.dtype == tf.uint8 and source.image_shape == (5, 4, 1)
    assert source.labels.dtype == np.int64 and source.num_classes == 3
    index = [7, 0, 19, 7]
    rows = _read(source, index)
    assert rows.dtype == np.uint8
    np.testing.assert_array_equal(rows, grey[index][..., None])
    as_float = source.to_float(tf.constant(rows)).numpy()
    np.testing.assert_array_equal(as_float, rows.astype(np.float32) / np.float32(255.0))

    digits = (np.random.default_rng(1).integers(0, 17, (9, 8, 8, 1)) / 16.0).astype(np.float32)
    floats = ArraySource(digits)
    assert floats.dtype == tf.float32 and floats.labels is None
    np.testing.assert_array_equal(_read(floats, [8, 2]), digits[[8, 2]])
    np.testing.assert_array_equal(floats.to_float(floats.read(tf.constant([3]))).numpy(),
                                  digits[[3]])

    for bad in ([-1], [20]):
        with pytest.raises((IndexError, tf.errors.InvalidArgumentError), match="out of range"):
            _read(source, bad)
    message = _one_line_error(ValueError, lambda: ArraySource(digits * 255, name="mine"))
    assert message.startswith("mine images:") and "[0, 1]" in message
    assert "1 labels" in _one_line_error(ValueError, lambda: ArraySource(grey, labels=[1]))


def test_array_source_read_inside_tf_data_does_not_embed_the_array():
    """Catches a read that puts the array into the graph (a tf.constant: 3.1 GiB of
    images became 14.1 GiB resident), and a batch iterator that reorders or drops
    images: iter_batches yields every image in index order, the last batch partial."""
    images = _random((1000, 32, 32, 1))  # 1 MiB
    source = ArraySource(images)
    dataset = tf.data.Dataset.range(1000).batch(10).map(
        source.read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    graph = dataset._as_serialized_graph(
        external_state_policy=tf.data.experimental.ExternalStatePolicy.WARN).numpy()
    assert len(graph) < 64 * 1024  # measured 1.7 KB; the array would add 1 MiB
    np.testing.assert_array_equal(np.concatenate(list(dataset.as_numpy_iterator())), images)

    batches = [batch.numpy() for batch in source.iter_batches(300)]
    assert [len(b) for b in batches] == [300, 300, 300, 100]
    assert all(b.dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches),
                                  images.astype(np.float32) / np.float32(255.0))


# -- ImageFolderSource: layout, order, pixels ------------------------------------


def test_folder_labels_order_and_lossless_pixels(tmp_path):
    """Catches wrong labels (classes = sorted sub-folders, label = position), an
    order other than (class, relative path) (files in nested folders included),
    pixels that are not bit-identical for PNG, BMP and grey GIF, a file name
    that is not UTF-8 (unreadable through a str tensor), an ignored file
    that is read (other extensions, hidden files and folders), and top-level
    images read in a class-folder tree (Keras ignores them)."""
    written = {}
    for relative, seed in [("b/2.png", 0), ("b/10.PNG", 1), ("a/z.bmp", 2), ("a/sub/a.png", 3),
                           ("c/x.png", 4), ("b/1.png", 5), ("b/3.gif", 6)]:
        if relative.endswith(".gif"):  # a palette: grey pixels come back exactly, as RGB
            grey = _random((6, 5), seed)
            _write(tmp_path / relative, grey)
            written[relative] = np.repeat(grey[..., None], 3, -1)
        else:
            written[relative] = _random((6, 5, 3), seed)
            _write(tmp_path / relative, written[relative])
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "._2.png").write_bytes(b"\x00\x05AppleDouble")  # macOS resource fork
    _write(tmp_path / ".hidden" / "h.png", _random((6, 5, 3), 5))
    _write(tmp_path / "c" / ".ipynb_checkpoints" / "x-checkpoint.png", _random((6, 5, 3), 5))
    _write(tmp_path / "top.png", _random((6, 5, 3), 6))
    latin1 = os.fsdecode(b"\xe9t\xe9.png")  # not UTF-8: the name's bytes must still open it
    written[f"c/{latin1}"] = _random((6, 5, 3), 8)
    _write(tmp_path / "c" / latin1, written[f"c/{latin1}"])

    source = ImageFolderSource(str(tmp_path))
    assert source.files == ("a/sub/a.png", "a/z.bmp", "b/1.png", "b/10.PNG", "b/2.png",
                            "b/3.gif", "c/x.png", f"c/{latin1}")
    assert source.class_names == ("a", "b", "c") and source.ignored == 1
    np.testing.assert_array_equal(source.labels, [0, 0, 1, 1, 1, 1, 2, 2])
    assert source.labels.dtype == np.int64
    assert (source.num_images, source.image_shape, source.dtype) == (8, (6, 5, 3), tf.uint8)
    index = [6, 0, 2, 1, 3, 5, 4, 0, 7]
    np.testing.assert_array_equal(_read(source, index),
                                  np.stack([written[source.files[i]] for i in index]))

    flat = tmp_path / "flat"
    colour = np.broadcast_to(np.array([200, 40, 90], np.uint8), (6, 5, 3))
    _write(flat / "one.jpg", colour, quality=95)
    _write(flat / "two.gif", np.full((6, 5), 77))
    _write(flat / "empty_folder_is_fine" / "readme.txt", np.zeros((1, 1)), format="PNG")
    unlabelled = ImageFolderSource(str(flat))
    assert unlabelled.labels is None and unlabelled.class_names is None
    assert unlabelled.files == ("one.jpg", "two.gif") and unlabelled.num_classes is None
    pixels = _read(unlabelled, [0, 1])
    np.testing.assert_array_equal(pixels[1], np.full((6, 5, 3), 77))  # grey GIF: exact
    assert np.abs(pixels[0].astype(int) - colour).max() <= 3  # JPEG: lossy, a flat colour
    assert sorted(IMAGE_EXTENSIONS) == [".bmp", ".gif", ".jpeg", ".jpg", ".png"]
    _write(tmp_path / "latin1" / latin1, _random((3, 2), 1))  # the first file is decoded in full
    assert ImageFolderSource(str(tmp_path / "latin1")).image_shape == (3, 2, 1)


def test_folder_matches_channels_and_resizes(tmp_path):
    """Catches grey files not repeated on 3 channels, RGB files not turned grey the
    same way for every format (decode_image(channels=1) fails on BMP and GIF),
    alpha not dropped, a conversion or resize that truncates instead of rounding,
    and a resize that is not bilinear with antialiasing."""
    grey = _random((6, 5), 1)
    rgb = _random((6, 5, 3), 2)
    rgba = np.concatenate([rgb, _random((6, 5, 1), 3)], axis=-1)
    _write(tmp_path / "rgb" / "0.png", rgb)
    _write(tmp_path / "rgb" / "1.png", grey)
    _write(tmp_path / "rgb" / "2.png", rgba)
    colour = ImageFolderSource(str(tmp_path / "rgb"))
    assert colour.image_shape == (6, 5, 3)
    np.testing.assert_array_equal(_read(colour, [0, 1, 2]),
                                  np.stack([rgb, np.repeat(grey[..., None], 3, -1), rgb]))

    _write(tmp_path / "grey" / "0.png", grey)
    _write(tmp_path / "grey" / "1.png", rgb)
    _write(tmp_path / "grey" / "2.bmp", rgb)
    as_grey = ImageFolderSource(str(tmp_path / "grey"), channels=1)
    assert as_grey.image_shape == (6, 5, 1)
    assert ImageFolderSource(str(tmp_path / "grey")).image_shape == (6, 5, 3)  # colour among the first 16
    weighted = tf.image.rgb_to_grayscale(rgb.astype(np.float32)).numpy()  # 0.2989 R + ...
    read = _read(as_grey, [0, 1, 2])
    np.testing.assert_array_equal(read[0, ..., 0], grey)
    np.testing.assert_array_equal(read[1], np.rint(weighted))
    np.testing.assert_array_equal(read[2], read[1])  # BMP: the same conversion as PNG

    big = _random((12, 10, 3), 4)
    _write(tmp_path / "mixed" / "0.png", rgb)  # the first image sets the size
    _write(tmp_path / "mixed" / "1.png", big)
    mixed = ImageFolderSource(str(tmp_path / "mixed"))
    assert mixed.image_shape == (6, 5, 3)
    expected = tf.image.resize(big, [6, 5], method="bilinear", antialias=True).numpy()
    read = _read(mixed, [0, 1])
    np.testing.assert_array_equal(read[0], rgb)
    np.testing.assert_array_equal(read[1], np.clip(np.rint(expected), 0, 255).astype(np.uint8))
    resized = ImageFolderSource(str(tmp_path / "mixed"), image_size=(3, 4))
    assert resized.image_shape == (3, 4, 3) and _read(resized, [0, 1]).shape == (2, 3, 4, 3)
    assert ImageFolderSource(str(tmp_path / "mixed"), image_size=12).image_shape == (12, 12, 3)


def test_folder_equals_array_source_bit_for_bit(tmp_path):
    """Catches any difference between reading a PNG folder and the in-memory array it
    was written from (order, labels, pixels, dtype) on random index batches read
    inside tf.data in parallel, and in iter_batches."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images[:200] * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target[:200]
    for i, (image, label) in enumerate(zip(images, labels)):
        _write(tmp_path / f"class_{label}" / f"{i:04d}.png", image)
    folder = ImageFolderSource(str(tmp_path))
    order = [int(os.path.basename(f)[:4]) for f in folder.files]
    arrays = ArraySource(images[order], labels[order], name="digits")
    np.testing.assert_array_equal(folder.labels, arrays.labels)
    assert folder.image_shape == arrays.image_shape == (8, 8, 1)

    batches = np.random.default_rng(0).integers(0, 200, (8, 32))
    for source_a, source_b in [(folder, arrays)]:
        read_a, read_b = (
            np.stack(list(tf.data.Dataset.from_tensor_slices(batches).map(
                s.read, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator()))
            for s in (source_a, source_b))
        assert read_a.dtype == read_b.dtype == np.uint8
        np.testing.assert_array_equal(read_a, read_b)
    np.testing.assert_array_equal(np.concatenate(list(folder.iter_batches(64))),
                                  np.concatenate(list(arrays.iter_batches(64))))


# -- ImageFolderSource: bad input -----------------------------------------------


def test_folder_bad_input_is_one_line_naming_the_folder_file_or_argument(tmp_path):
    """Catches a missing check for: a missing folder, a file given as folder, an
    empty folder, a folder without image files (the message lists the extensions
    read), a class folder without images (named), a non-positive or malformed
    image_size, channels other than 1 or 3, and a corrupt file (empty,
    truncated, text named .jpg): each must be one line naming it."""
    missing = str(tmp_path / "nope")
    assert missing in _one_line_error(FileNotFoundError, lambda: ImageFolderSource(missing))
    good = tmp_path / "good"
    path = _write(good / "a.png", _random((4, 4, 3)))
    assert path in _one_line_error(ValueError, lambda: ImageFolderSource(path))
    (tmp_path / "empty").mkdir()
    message = _one_line_error(ValueError, lambda: ImageFolderSource(str(tmp_path / "empty")))
    assert "no image files" in message and ".jpg" in message and ".gif" in message
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    assert "no image files" in _one_line_error(
        ValueError, lambda: ImageFolderSource(str(tmp_path / "texts")))

    _write(tmp_path / "classes" / "cat" / "0.png", _random((4, 4, 3)))
    (tmp_path / "classes" / "dog").mkdir()
    (tmp_path / "classes" / "dog" / "readme.md").write_text("x")
    message = _one_line_error(ValueError, lambda: ImageFolderSource(str(tmp_path / "classes")))
    assert str(tmp_path / "classes" / "dog") in message and "no image files" in message

    for bad in (0, -3, (4, 0), (4,), True, "8", 2.5):
        message = _one_line_error(ValueError, lambda: ImageFolderSource(str(good), image_size=bad))
        assert message.startswith("image_size must be") and repr(bad) in message
    for bad in (2, 4, 0, True, "3"):
        message = _one_line_error(ValueError, lambda: ImageFolderSource(str(good), channels=bad))
        assert message.startswith("channels must be 1 or 3") and repr(bad) in message

    png = (good / "a.png").read_bytes()
    for name, data in [("empty.png", b""), ("cut.png", png[: len(png) // 2]),
                       ("page.jpg", b"<html>not found</html>")]:
        corrupt = tmp_path / f"corrupt_{name}"
        corrupt.mkdir()
        (corrupt / "0_ok.png").write_bytes(png)
        (corrupt / name).write_bytes(data)
        message = _one_line_error(ValueError, lambda: ImageFolderSource(str(corrupt)))
        assert str(corrupt / name) in message and "skip_corrupt" in message


def test_folder_skip_corrupt_counts_and_names_the_skipped_files(tmp_path):
    """Catches skip_corrupt not skipping, a wrong count or names in `skipped`, a
    valid JPEG with data after its end marker dropped as corrupt (phone "motion
    photos" append a video), a class left empty by skipping accepted, and an
    all-corrupt folder accepted."""
    png = tmp_path / "src.png"
    _write(png, _random((4, 4, 3)))
    data = png.read_bytes()
    folder = tmp_path / "data"
    for i in range(3):
        _write(folder / "a" / f"{i}.png", _random((4, 4, 3), i))
    _write(folder / "a" / "tail.jpg", _random((4, 4, 3)), quality=95)
    with open(folder / "a" / "tail.jpg", "ab") as handle:
        handle.write(b"appended video bytes" * 10)
    (folder / "b").mkdir()
    (folder / "b" / "ok.png").write_bytes(data)
    for i in range(6):
        (folder / "b" / f"bad{i}.png").write_bytes(data[:30])
    (folder / "a" / "zero.gif").write_bytes(b"")

    source = ImageFolderSource(str(folder), skip_corrupt=True)
    assert source.num_images == 5 and len(source.skipped) == 7
    assert "a/tail.jpg" in source.files
    assert source.skipped == ("a/zero.gif",) + tuple(f"b/bad{i}.png" for i in range(6))
    summary = source.skipped_summary()
    assert summary.startswith("skipped 7 unreadable image file(s)") and "and 2 more" in summary
    np.testing.assert_array_equal(source.labels, [0, 0, 0, 0, 1])

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(data[:30])
    assert "all 1 image files" in _one_line_error(
        ValueError, lambda: ImageFolderSource(str(only_bad), skip_corrupt=True))
    (folder / "b" / "ok.png").unlink()
    message = _one_line_error(ValueError, lambda: ImageFolderSource(str(folder), skip_corrupt=True))
    assert str(folder / "b") in message and "no readable image files" in message


def test_folder_read_names_a_file_that_fails_to_decode_in_tf_data(tmp_path):
    """Catches a decode failure inside tf.data surfacing as TensorFlow's own error,
    which does not name the file: `read_error` must name the path of the sample,
    and only for its own source's error (another source has other indices)."""
    for i in range(4):
        _write(tmp_path / f"{i}.png", _random((5, 5, 3), i))
    source = ImageFolderSource(str(tmp_path))
    # Damage the middle of a file after the scan: its signature and end stay intact.
    damaged = bytearray((tmp_path / "2.png").read_bytes())
    damaged[40:60] = b"\x00" * 20
    (tmp_path / "2.png").write_bytes(bytes(damaged))
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant([[0, 1], [3, 2]], tf.int64)).map(
        source.read, num_parallel_calls=2)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        list(dataset)
    message = source.read_error(error.value)
    assert message is not None and "\n" not in message
    assert message.startswith(f"image file {tmp_path / '2.png'} cannot be read or decoded")
    assert source.read_error(ValueError("something else")) is None
    _write(tmp_path / "other" / "0.png", _random((5, 5, 3), 9))
    assert ImageFolderSource(str(tmp_path / "other")).read_error(error.value) is None


def test_folder_fingerprint_follows_the_file_list(tmp_path):
    """Catches a fingerprint that misses a file added, removed, renamed or rewritten
    with another size (a resumed run would index other images), or that changes
    when nothing did (mtimes must not count)."""
    for i in range(3):
        _write(tmp_path / "c" / f"{i}.png", _random((4, 4, 3), i))

    def fingerprint():
        return ImageFolderSource(str(tmp_path)).fingerprint()

    first = fingerprint()
    assert len(first) == 16 and fingerprint() == first
    os.utime(tmp_path / "c" / "0.png", (1, 1))
    assert fingerprint() == first
    seen = {first}
    _write(tmp_path / "c" / "3.png", _random((4, 4, 3), 3))
    seen.add(fingerprint())
    (tmp_path / "c" / "3.png").rename(tmp_path / "c" / "4.png")
    seen.add(fingerprint())
    (tmp_path / "c" / "4.png").unlink()
    assert fingerprint() == first  # back to the original list
    size = os.path.getsize(tmp_path / "c" / "1.png")
    _write(tmp_path / "c" / "1.png", _random((4, 4, 3), 9) // 16)  # same name, other size
    assert os.path.getsize(tmp_path / "c" / "1.png") != size
    seen.add(fingerprint())
    assert len(seen) == 4
    assert ArraySource(np.zeros((3, 4, 4, 1), np.uint8)).fingerprint() != ArraySource(
        np.zeros((4, 4, 4, 1), np.uint8)).fingerprint()


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))


def test_benchmark_folder_probe_writes_and_reads_n_files(tmp_path):
    """Catches benchmarks/image_sources.py measuring another folder than asked:
    N files in 10 class folders written, all N scanned, images of the size asked."""
    from benchmarks.image_sources import folder_probe, write_folder

    write_folder(str(tmp_path), 30, 8)
    assert sorted(os.listdir(tmp_path)) == [f"class_{i}" for i in range(10)]
    row = folder_probe(str(tmp_path), batch=8, read_images=16)
    assert (row["n"], row["image_shape"]) == (30, [8, 8, 3])
    assert row["read_images_per_s"] > 0 and row["scan_s"] >= 0


def test_held_out_folder_keeps_the_training_labels_of_its_classes(tmp_path):
    """Catches a held-out folder numbering its classes by its own sub-folders
    (audit): with training classes cat, dog, fox and held-out cat, fox, the
    held-out fox images got label 1 (dog) and the scores were silently wrong.
    They must keep label 2; a held-out class the training folder lacks is
    refused in one line naming it."""
    import emc2_tf

    for split, classes in (("train", ("cat", "dog", "fox")), ("val", ("cat", "fox"))):
        for label, name in enumerate(classes):
            for i in range(4):
                _write(tmp_path / split / name / f"{i}.png", _random((6, 6), seed=label * 10 + i))
    data = emc2_tf.load_dataset("folder", str(tmp_path / "train"),
                                test_data_dir=str(tmp_path / "val"))
    assert data.train_images.class_names == data.test_images.class_names == ("cat", "dog", "fox")
    assert data.test_labels.tolist() == [0, 0, 0, 0, 2, 2, 2, 2]
    assert [f.split("/")[0] for f in data.test_images.files] == ["cat"] * 4 + ["fox"] * 4
    _write(tmp_path / "val" / "emu" / "0.png", _random((6, 6)))
    message = _one_line_error(ValueError, lambda: emc2_tf.load_dataset(
        "folder", str(tmp_path / "train"), test_data_dir=str(tmp_path / "val")))
    assert f"class folder {tmp_path / 'val' / 'emu'} is not one of the 3 training classes" in (
        message)


def test_folder_notes_ignored_files_and_grey_and_probes_channels(tmp_path):
    """Catches (audit) image files beside class folders dropped without a word,
    one grey image first in sorted order turning a colour folder grey, and a
    folder that cannot be listed failing with a raw PermissionError."""
    _write(tmp_path / "mixed" / "a.png", _random((6, 6, 3)))
    _write(tmp_path / "mixed" / "b.png", _random((6, 6, 3)))
    _write(tmp_path / "mixed" / "previews" / "p.png", _random((6, 6, 3)))
    mixed = ImageFolderSource(tmp_path / "mixed")
    assert mixed.num_images == 1 and mixed.ignored == 2
    assert mixed.notes() == [
        f"ignored 2 image file(s) directly inside {tmp_path / 'mixed'}: beside class folders "
        "(previews) only the class folders' images are read; move them into a class folder, "
        "or the sub-folders out, to train on them."]
    _write(tmp_path / "photos" / "000_grey.png", _random((6, 6)))
    _write(tmp_path / "photos" / "001_colour.png", _random((6, 6, 3)))
    assert ImageFolderSource(tmp_path / "photos").image_shape == (6, 6, 3)
    assert ImageFolderSource(tmp_path / "photos").notes() == []
    _write(tmp_path / "grey" / "0.png", _random((6, 6)))
    grey = ImageFolderSource(tmp_path / "grey")
    assert grey.image_shape == (6, 6, 1)
    assert grey.notes() == ["grey: read as grey (1 channel): the first 1 images are grey."]
    assert ImageFolderSource(tmp_path / "grey", channels=1).notes() == []

    listing = os.scandir

    def refuse(path):
        if str(path).endswith("previews"):
            raise PermissionError(13, "Permission denied")
        return listing(path)

    os.scandir = refuse
    try:
        message = _one_line_error(ValueError, lambda: ImageFolderSource(tmp_path / "mixed"))
    finally:
        os.scandir = listing
    assert message == (f"image folder {tmp_path / 'mixed' / 'previews'} cannot be read "
                       "(Permission denied).")


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
