"""A folder of image files as a source: image i read from disk by sample index.

`ImageFolderSource` follows `keras.utils.image_dataset_from_directory`'s
layout:

- one sub-folder per class (searched recursively): labels are the positions
  of the class folders in sorted order;
- a flat folder (image files directly inside, no sub-folder holding any):
  unlabelled (`labels` is None);
- both (image files at the top AND class folders): the top-level files are
  ignored, as Keras does (`ignored` counts them).

Files are read by extension, case-insensitive: .jpg .jpeg .png .bmp .gif;
everything else, and every name starting with "." (hidden files and folders,
e.g. macOS `._x.jpg` resource forks, `.ipynb_checkpoints`), is ignored. The
order is sorted by (class, relative path), the same on every machine. Only
the table of paths stays in memory: `read` opens and decodes the B requested
files inside `tf.data`.

Scanning checks each file cheaply (its first 16 and last 12 bytes: the
format's signature and end marker); a file that fails the check is decoded
once to confirm, so valid files with trailing data are kept. Damage inside
a file that passes the check is caught while reading: `read` names the file
(see `read_error`).
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

import numpy as np
import tensorflow as tf

from emc2_tf.data.image_source import ImageSource, fingerprint_of

#: File extensions read, lower case (compared case-insensitively).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")

#: Marker of the in-graph error raised when a file cannot be read or decoded.
UNREADABLE_FILE_MESSAGE = "emc2_tf: unreadable image file"

#: How many of the first images decide the default channels (any in colour → 3).
CHANNEL_PROBE = 16

#: How many skipped files a summary names.
SKIPPED_SHOWN = 5

_EXTENSIONS_TEXT = " ".join(IMAGE_EXTENSIONS) + " (case-insensitive)"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _image_files(folder: str, relative_to: str, recursive: bool) -> list[tuple[str, int]]:
    """`(relative path with '/', size in bytes)` of the image files in `folder`.

    Hidden names (starting with ".") are skipped. Recursive: descends into
    sub-folders (not into symbolic links to folders, as Keras'
    `follow_links=False`).
    """
    found = []
    with _listing(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file() and _is_image_name(entry.name):
                relative = os.path.relpath(entry.path, relative_to).replace(os.sep, "/")
                found.append((relative, entry.stat().st_size))
            elif recursive and entry.is_dir(follow_symlinks=False):
                found.extend(_image_files(entry.path, relative_to, recursive=True))
    return found


def _listing(folder: str):
    """`os.scandir(folder)`; a folder that cannot be listed (permissions, I/O) is
    a one-line `ValueError` naming it."""
    try:
        return os.scandir(folder)
    except OSError as error:
        raise ValueError(f"image folder {folder} cannot be read "
                         f"({error.strerror or error}).") from None


def looks_complete(head: bytes, tail: bytes, size: int) -> bool:
    """Whether a file's first 16 and last 12 bytes show a complete image: a
    PNG, JPEG, GIF or BMP signature and that format's end (PNG's IEND chunk,
    JPEG's EOI marker, GIF's trailer, BMP's declared size). O(1) bytes per
    file: no decoding. False does not prove damage (e.g. data appended after
    a JPEG's end): the caller decodes such files to decide.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return tail[-8:-4] == b"IEND"
    if head.startswith(b"\xff\xd8\xff"):
        return tail[-2:] == b"\xff\xd9"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return tail[-1:] == b";"
    if head.startswith(b"BM") and len(head) >= 6:
        return 0 < struct.unpack("<I", head[2:6])[0] <= size
    return False


def _head_and_tail(path: str, size: int) -> tuple[bytes, bytes]:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return os.pread(descriptor, 16, 0), os.pread(descriptor, 12, max(0, size - 12))
    finally:
        os.close(descriptor)


def _decoded_shape(path: str) -> tuple[int, int, int] | None:
    """`(height, width, channels)` as TensorFlow decodes the file (the decoder
    `read` uses), or None when it cannot."""
    try:
        data = tf.io.read_file(os.fsencode(path))  # bytes: any file name
        image = tf.io.decode_image(data, channels=0, expand_animations=False)
    except (tf.errors.OpError, ValueError):
        return None
    return tuple(int(d) for d in image.shape)


def _is_readable(path: str, size: int) -> bool:
    """The scan's check: cheap head/tail bytes, a full decode only when they
    look wrong. Unreadable files (permissions, I/O errors) fail it."""
    try:
        if size > 0 and looks_complete(*_head_and_tail(path, size), size):
            return True
    except OSError:
        return False
    return size > 0 and _decoded_shape(path) is not None


def _check_image_size(image_size: Any, directory: str) -> tuple[int, int] | None:
    """`image_size` as `(height, width)`, or a one-line `ValueError` naming it."""
    if image_size is None:
        return None
    pair = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
    try:
        height, width = pair
        valid = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                    for v in (height, width))
    except (TypeError, ValueError):
        valid = False
    if not valid or isinstance(image_size, bool):
        raise ValueError(f"image_size must be a positive integer or a (height, width) pair of "
                         f"positive integers (pixels of the images read from {directory}); got "
                         f"{image_size!r}.")
    return int(height), int(width)


def _describe_skipped(skipped: tuple[str, ...]) -> str:
    shown = ", ".join(skipped[:SKIPPED_SHOWN])
    more = f" and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    return f"{shown}{more}"


class ImageFolderSource(ImageSource):
    """Image files in a folder, read and decoded per batch, as uint8.

    Args:
        directory: one sub-folder per class, or a flat folder of images
            (unlabelled); see the module docstring for the layout rules.
        image_size: `int` or `(height, width)`: every image is resized to it
            when its own size differs. Default: the size of the first image
            (in sorted order); images of other sizes are resized to it.
            Resizing is bilinear with antialiasing (`tf.image.resize(...,
            "bilinear", antialias=True)`: an area-weighted filter when
            shrinking), rounded back to uint8; the aspect ratio is not kept.
        channels: 1 or 3. Default: 3 when any of the first
            `CHANNEL_PROBE` images (in sorted order) is in colour, else 1
            (grey or grey+alpha → 1, RGB or RGBA → 3; GIFs decode as RGB,
            animated ones as their first frame; 16-bit PNGs are scaled to 8
            bits): one grey photo first in a colour data set does not make it
            grey. Grey files in a 3-channel
            source are repeated on the 3 channels; RGB files in a 1-channel
            source become grey with `tf.image.rgb_to_grayscale`'s weights,
            rounded; alpha is dropped.
        skip_corrupt: leave out the files the scan finds unreadable (named in
            `skipped`) instead of refusing the folder.
        class_names: the class of each label, in label order (e.g. the
            training folder's `class_names` for its held-out folder): each
            sub-folder gets the label of its name there, so a held-out folder
            holding only some classes keeps the training labels. A sub-folder
            not named there is refused. Default: the sub-folders, sorted.
        name: names the source in messages; default the folder's base name.

    Raises:
        FileNotFoundError: `directory` does not exist.
        ValueError: one line naming the folder, file or argument: not a
            folder, no image files, a class folder without images, a bad
            `image_size` or `channels`, an unreadable or corrupt file
            (unless `skip_corrupt`).
    """

    def __init__(
        self,
        directory: str,
        image_size: int | tuple[int, int] | None = None,
        channels: int | None = None,
        skip_corrupt: bool = False,
        name: str | None = None,
        class_names: tuple[str, ...] | list[str] | None = None,
    ):
        directory = os.fspath(directory)
        if not os.path.exists(directory):
            raise FileNotFoundError(f"image folder {directory} does not exist.")
        if not os.path.isdir(directory):
            raise ValueError(f"image folder {directory} is not a folder.")
        size = _check_image_size(image_size, directory)
        if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)
                                     or not isinstance(channels, (int, np.integer))):
            raise ValueError(f"channels must be 1 or 3 (or None: the first image's) for the "
                             f"images of {directory}; got {channels!r}.")
        self.directory = directory
        self._channels_given = channels is not None
        self.name = name or os.path.basename(os.path.normpath(directory)) or directory
        files, self.class_names, self.ignored = self._scan(directory)
        if class_names is not None and self.class_names is not None:
            files = self._relabel(files, tuple(class_names))
        files, self.skipped, first = self._drop_unreadable(files, skip_corrupt)
        if self.class_names is not None:
            self._check_classes(files)
        self.files = tuple(relative for relative, _, _ in files)
        self.num_images = len(self.files)
        self.labels = (None if self.class_names is None
                       else np.array([label for _, label, _ in files], np.int64))
        self._fingerprint = fingerprint_of(
            [f"folder {self.num_images}"]
            + [f"{relative}\t{nbytes}" for relative, _, nbytes in files])
        self.image_shape = (*(size or first[:2]), channels or self._default_channels(first))
        self.dtype = tf.uint8
        # Bytes, not str: a file name that is not valid UTF-8 is read all the same.
        self._paths = tf.constant([os.fsencode(self.path(i)) for i in range(self.num_images)])

    # -- scanning ---------------------------------------------------------

    def _scan(self, directory: str) -> tuple[list, tuple[str, ...] | None, int]:
        """`([(relative path, label, bytes)], class names or None, ignored count)`,
        sorted by (class, relative path)."""
        top = _image_files(directory, directory, recursive=False)
        with _listing(directory) as entries:
            folders = sorted(entry.name for entry in entries
                             if not entry.name.startswith(".") and entry.is_dir())
        per_class = {name: _image_files(os.path.join(directory, name), directory, recursive=True)
                     for name in folders}
        if any(per_class.values()):
            empty = [name for name in folders if not per_class[name]]
            if empty:
                raise ValueError(self._empty_class_message(empty))
            files = [(relative, label, nbytes) for label, name in enumerate(folders)
                     for relative, nbytes in sorted(per_class[name])]
            return files, tuple(folders), len(top)
        if not top:
            raise ValueError(f"image folder {directory} holds no image files: read are "
                             f"{_EXTENSIONS_TEXT}, directly inside it (unlabelled) or in one "
                             "sub-folder per class.")
        return [(relative, -1, nbytes) for relative, nbytes in sorted(top)], None, 0

    def _empty_class_message(self, empty: list[str]) -> str:
        names = ", ".join(os.path.join(self.directory, name) for name in empty[:SKIPPED_SHOWN])
        more = f" (and {len(empty) - SKIPPED_SHOWN} more)" if len(empty) > SKIPPED_SHOWN else ""
        return (f"class folder {names}{more} holds no image files (read are {_EXTENSIONS_TEXT}); "
                f"every sub-folder of {self.directory} is a class: add images or remove it.")

    def _drop_unreadable(self, files, skip_corrupt: bool):
        """`(files passing the scan's check, relative paths of the others, the
        decoded shape of the first kept file)`; without `skip_corrupt`, the
        first unreadable file is a `ValueError`.

        The first kept file is decoded in full (its size and channels are the
        defaults): one that passes the quick check yet fails to decode counts
        as unreadable too.
        """
        kept, skipped, first = [], [], None
        for item in files:
            path = os.path.join(self.directory, item[0])
            readable = _is_readable(path, item[2])
            if readable and first is None:
                first = _decoded_shape(path)
                readable = first is not None
            if readable:
                kept.append(item)
            elif skip_corrupt:
                skipped.append(item[0])
            else:
                raise ValueError(self._unreadable_message(path))
        if not kept:
            raise ValueError(f"image folder {self.directory}: all {len(skipped)} image files are "
                             f"unreadable or corrupt ({_describe_skipped(tuple(skipped))}).")
        return kept, tuple(skipped), first

    def _relabel(self, files, class_names: tuple[str, ...]):
        """`files` labelled by their class' position in `class_names` (which
        become this source's), in (label, path) order; a class folder not in
        `class_names` is a one-line `ValueError`."""
        unknown = [name for name in self.class_names if name not in class_names]
        if unknown:
            raise ValueError(
                f"class folder {os.path.join(self.directory, unknown[0])} is not one of the "
                f"{len(class_names)} training classes ({', '.join(class_names[:SKIPPED_SHOWN])}"
                f"{', …' if len(class_names) > SKIPPED_SHOWN else ''}): a held-out folder may "
                "hold only classes of the training folder.")
        position = {name: class_names.index(name) for name in self.class_names}
        self._present = {position[name] for name in self.class_names}
        self.class_names = class_names
        relabelled = [(relative, position[relative.split("/", 1)[0]], nbytes)
                      for relative, _, nbytes in files]
        return sorted(relabelled, key=lambda item: (item[1], item[0]))

    def _check_classes(self, files) -> None:
        """Every class folder keeps an image after skipping (labels must stay
        dense; with `class_names`, only the classes present are checked)."""
        present = {label for _, label, _ in files}
        expected = getattr(self, "_present", range(len(self.class_names)))
        empty = [self.class_names[label] for label in sorted(expected) if label not in present]
        if empty:
            raise ValueError(self._empty_class_message(empty).replace(
                "holds no image files", "holds no readable image files"))

    def _default_channels(self, first: tuple[int, int, int]) -> int:
        """3 if the first image or any of the next `CHANNEL_PROBE` − 1 is in colour, else 1."""
        if first[2] > 2:
            return 3
        for relative in self.files[1:CHANNEL_PROBE]:
            shape = _decoded_shape(os.path.join(self.directory, relative))
            if shape is not None and shape[2] > 2:
                return 3
        return 1

    def notes(self) -> list[str]:
        """One line per thing a user should know that is not an error: files
        skipped (`skip_corrupt`), image files left out beside class folders
        (Keras' rule), images read as grey."""
        lines = [self.skipped_summary()] if self.skipped else []
        if self.ignored:
            lines.append(
                f"ignored {self.ignored} image file(s) directly inside {self.directory}: "
                f"beside class folders ({', '.join(self.class_names[:SKIPPED_SHOWN])}"
                f"{', …' if len(self.class_names) > SKIPPED_SHOWN else ''}) only the class "
                "folders' images are read; move them into a class folder, or the sub-folders "
                "out, to train on them.")
        if self.image_shape[2] == 1 and not self._channels_given:
            lines.append(f"{self.name}: read as grey (1 channel): the first "
                         f"{min(CHANNEL_PROBE, self.num_images)} images are grey.")
        return lines

    @staticmethod
    def _unreadable_message(path: str) -> str:
        return (f"image file {path} is unreadable or corrupt (empty, truncated, or not a "
                "JPEG/PNG/BMP/GIF image): replace or delete it, or pass skip_corrupt=True "
                "(--skip_corrupt) to leave such files out.")

    # -- the source -------------------------------------------------------

    def path(self, index: int) -> str:
        """The file of sample `index`."""
        return os.path.join(self.directory, self.files[index])

    def skipped_summary(self) -> str:
        """One line saying how many files were skipped and naming the first few
        ('' when none were)."""
        if not self.skipped:
            return ""
        return (f"skipped {len(self.skipped)} unreadable image file(s) in {self.directory}: "
                f"{_describe_skipped(self.skipped)}.")

    def fingerprint(self) -> str:
        """N and the sorted relative paths with their sizes in bytes.

        A file added, removed, renamed or rewritten with another size changes
        it; modification times do not count (a copy to another machine keeps
        the fingerprint), nor do `image_size` and `channels` (they change
        the model's input, which a checkpoint already refuses).
        """
        return self._fingerprint

    def _decode(self, path: tf.Tensor) -> tf.Tensor:
        """One file as uint8 `image_shape`: decoded, channels matched, resized."""
        height, width, channels = self.image_shape
        data = tf.io.read_file(path)
        if channels == 3:
            # Grey → repeated, alpha dropped, for every format (the decoder does it).
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
        else:
            # decode_image(channels=1) fails on BMP and GIF and its PNG/JPEG
            # conversions differ: one conversion for all formats instead.
            image = tf.io.decode_image(data, channels=0, expand_animations=False)
            image = tf.cond(
                tf.shape(image)[-1] <= 2,
                lambda: image[..., :1],
                lambda: _round_to_uint8(tf.image.rgb_to_grayscale(
                    tf.cast(image[..., :3], tf.float32))))
        return tf.ensure_shape(resize_image(image, height, width), self.image_shape)

    def read(self, index: tf.Tensor) -> tf.Tensor:
        """Files `index` (int64 `[B]`) decoded as uint8 `[B, H, W, C]`.

        The B files are read and decoded in parallel by a small `tf.data`
        pipeline that drops what fails to decode; if any did, an in-graph
        assertion fails with `UNREADABLE_FILE_MESSAGE`, the sample index and
        the path (TensorFlow's own decode errors do not name the file).
        `read_error` turns that error into one line.
        """
        index = tf.cast(index, tf.int64)
        paths = tf.gather(self._paths, index)
        count = tf.shape(index, out_type=tf.int64)[0]
        decoded = (
            tf.data.Dataset.from_tensor_slices((tf.range(count), paths))
            .map(lambda position, path: (position, self._decode(path)),
                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .ignore_errors()
            .batch(count + 1)
            # An empty result (every file failed, or B = 0) still yields one batch.
            .concatenate(tf.data.Dataset.from_tensors(
                (tf.zeros([0], tf.int64), tf.zeros([0, *self.image_shape], tf.uint8))))
            .take(1)
        )
        positions, images = decoded.get_single_element()
        failed = tf.sets.difference(tf.range(count)[None], positions[None]).values[:1]
        check = tf.debugging.Assert(
            tf.shape(positions, out_type=tf.int64)[0] == count,
            [UNREADABLE_FILE_MESSAGE, f"source {self._fingerprint}", tf.gather(index, failed),
             tf.gather(paths, failed)],
            summarize=1)
        with tf.control_dependencies([check]):
            return tf.ensure_shape(tf.identity(images), [index.shape[0], *self.image_shape])

    def read_error(self, error: BaseException) -> str | None:
        """One line naming the file for the error this source's `read` raised on
        an unreadable file (found by its sample index), else None (another
        error, or another source's: the assertion carries the fingerprint)."""
        # The assertion's data follow the marker: the fingerprint, the index, the path.
        match = re.search(re.escape(UNREADABLE_FILE_MESSAGE) + r".{0,8}?source ([0-9a-f]{16})"
                          r"\D{0,8}?(\d+)", str(error), re.S)
        if match is None or match.group(1) != self._fingerprint:
            return None
        path = self.path(int(match.group(2)))
        return (f"image file {path} cannot be read or decoded: it is damaged inside (the "
                "scan checks only its first and last bytes), or it changed or went away after "
                "the folder was scanned; replace or delete it.")


def resize_image(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """uint8 `[h, w, C]` (or a batch `[B, h, w, C]`) resized to `(height, width)`:
    bilinear with antialiasing, rounded back to uint8, unchanged when already
    that size. The one resize of the image sources (folder and TFDS)."""
    same_size = tf.reduce_all(tf.shape(image)[-3:-1] == [height, width])
    return tf.cond(same_size, lambda: image, lambda: _round_to_uint8(
        tf.image.resize(image, [height, width], method="bilinear", antialias=True)))


def _round_to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Float pixels (0..255 scale) rounded to the nearest uint8."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
