"""A TensorFlow Datasets split as a source: image i read by index from ArrayRecord files.

`TFDSSource` opens any TFDS split expression (`"train+unlabelled"`,
`"train[:10%]"`, `"test"`) with `tfds.data_source`'s machinery
(`builder.as_data_source`): the data are read by record index from the
ArrayRecord files TFDS prepared, and decoded by TFDS into uint8 NumPy images,
B at a time inside `tf.data` (`read`). No image is loaded into memory up
front (the labels are, on first use: 8 bytes per example); the index order is the order `tfds.load(split, shuffle_files=False)`
yields.

Random access needs the data prepared as ArrayRecord. TFDS prepares
TFRecord by default (`tfds.load`, `tfds build`), which can only be streamed:
such a data set is refused in one line that gives the command converting it
in place (`python -m emc2_tf.data.tfds_prepare NAME --data_dir=DIR`, which
adds ArrayRecord files next to the TFRecord ones). Streaming instead would
lose what EMC² needs: uniform batches drawn by index and chain state
addressed by sample index.

Example:

```python
source = TFDSSource("stl10", split="train+unlabelled", data_dir="/data/tfds")
source.num_images        # 105000
source.read(tf.constant([0, 5]))  # uint8 [2, 96, 96, 3]
```

STL-10's split of unlabelled images is named `unlabelled` in TFDS (British
spelling). Examples without a label (STL-10 stores -1) keep the label -1.
"""

from __future__ import annotations

import difflib
import importlib.resources
import importlib.resources.abc  # noqa: F401  (the attribute TFDS reads: see _import_tfds)
import importlib.util
import os
import re
import sys
from typing import Any

import numpy as np
import tensorflow as tf

from emc2_tf.data.folder import _check_image_size, resize_image
from emc2_tf.data.image_source import ImageSource, fingerprint_of

#: The label of an example that has none (STL-10's `unlabelled` split).
NO_LABEL = -1

#: The file format `prepare_tfds` writes: it supports random access by index.
ARRAY_RECORD = "array_record"

#: How many close names an unknown data set or split suggests.
CLOSE_MATCHES = 3

#: `TFDSSource._labels` before the labels are read.
_NOT_READ = object()

#: Marker of the error a record that cannot be read raises inside `read`.
READ_FAILED_MESSAGE = "emc2_tf: unreadable TFDS record"


def _import_tfds():
    """`tensorflow_datasets`, with the module its 4.9.10 release forgot.

    TFDS 4.9.10 imports `importlib_resources` (the PyPI back-port) without
    declaring it for Python ≥ 3.9, and `download_and_prepare` fails on it
    (tensorflow/datasets#11212). Its only use is
    `importlib_resources.abc.Traversable`, which the standard library's
    `importlib.resources` provides: that module stands in when the back-port
    is absent (etils does the same).
    """
    if "importlib_resources" not in sys.modules and importlib.util.find_spec(
            "importlib_resources") is None:
        sys.modules["importlib_resources"] = importlib.resources
    import tensorflow_datasets as tfds

    return tfds


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= 200 else line[:200] + "…"


def _where(data_dir: str | None) -> str:
    return data_dir or "TFDS' default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"


def _prepare_command(name: str, data_dir: str | None) -> str:
    return f"python -m emc2_tf.data.tfds_prepare {name} --data_dir={data_dir or 'DIR'}"


def _builder(tfds, name: str, data_dir: str | None):
    """The TFDS builder of `name` (`"stl10"`, `"cifar10:3.0.2"`), reading from
    `data_dir`; a one-line `ValueError` naming `name` when there is none."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a TFDS data set name such as 'stl10'; got {name!r}.")
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # Its own message lists the whole catalogue (over a thousand lines).
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split("/")[0].split(":")[0],
                                          list(dict.fromkeys(known)), n=CLOSE_MATCHES)
        hint = f"close names: {', '.join(close)}" if close else "see tfds.list_builders()"
        raise ValueError(f"name={name!r}: no TensorFlow Datasets data set has that name, "
                         f"and none is prepared under that name in {_where(data_dir)} "
                         f"({hint}).") from None
    except Exception as error:  # a bad version or config: tfds raises several types
        raise ValueError(f"name={name!r}: TFDS cannot open this data set "
                         f"({type(error).__name__}: {_first_line(error)}).") from None


def _ensure_prepared(builder, name: str, data_dir: str | None, download: bool) -> None:
    """Prepares the data set as ArrayRecord when `download`, else refuses an
    unprepared one in one line saying how to prepare it."""
    if builder.is_prepared():
        return
    if not download:
        raise ValueError(
            f"TFDS data set {name!r} is not prepared in {_where(data_dir)}: pass "
            f"download=True (--download) to let TFDS download and prepare it there, or run "
            f"`{_prepare_command(name, data_dir)}` on a machine with network and copy "
            "that data_dir here.")
    try:
        builder.download_and_prepare(file_format=ARRAY_RECORD)
    except Exception as error:  # network, checksum, manual_dir: tfds raises many types
        raise ValueError(f"TFDS could not download and prepare {name!r} in "
                         f"{_where(data_dir)} ({type(error).__name__}: "
                         f"{_first_line(error)}).") from None


def prepare_tfds(name: str, data_dir: str | None = None, download: bool = True) -> str:
    """Makes a TFDS data set readable by index: prepared as ArrayRecord.

    - not prepared: downloads and prepares it as ArrayRecord (`download`);
    - prepared as TFRecord (TFDS' default): writes an ArrayRecord copy of each
      shard next to it and records the format in `dataset_info.json`, as
      `tfds convert_format` does (that command needs apache-beam, which the
      TFDS wheel does not install: tensorflow/datasets#5463);
    - already readable by index: nothing.

    Returns the data set's folder (`DIR/NAME/VERSION`). Errors are one-line
    `ValueError`s naming the data set.
    """
    tfds = _import_tfds()
    builder = _builder(tfds, name, data_dir)
    _ensure_prepared(builder, name, data_dir, download)
    from tensorflow_datasets.core import dataset_info as dataset_info_lib
    from tensorflow_datasets.core import file_adapters
    from tensorflow_datasets.core.utils import py_utils

    info = dataset_info_lib.read_proto_from_builder_dir(builder.data_dir)
    formats = {file_adapters.FileFormat(f) for f in dataset_info_lib.available_file_formats(info)}
    if formats & set(file_adapters.FileFormat.with_random_access()):
        return os.fspath(builder.data_dir)
    source_format = file_adapters.FileFormat(info.file_format)
    target_format = file_adapters.FileFormat(ARRAY_RECORD)
    splits = dataset_info_lib.get_split_dict_from_proto(
        dataset_info_proto=info, data_dir=builder.data_dir, file_format=source_format)
    for split in splits.values():
        source_template = split.filename_template
        target_template = source_template.replace(filetype_suffix=target_format.file_suffix)
        for shard in range(split.num_shards):
            source = source_template.sharded_filepath(shard_index=shard,
                                                      num_shards=split.num_shards)
            target = target_template.sharded_filepath(shard_index=shard,
                                                      num_shards=split.num_shards)
            if target.exists():
                continue
            records = file_adapters.ADAPTER_FOR_FORMAT[source_format].make_tf_data(source)
            with py_utils.incomplete_file(target) as partial:
                file_adapters.ADAPTER_FOR_FORMAT[target_format].write_examples(
                    partial, ((i, record.numpy()) for i, record in enumerate(records)))
    info.alternative_file_formats.append(target_format.value)
    dataset_info_lib.write_dataset_info_proto(info, dataset_info_dir=builder.data_dir)
    return os.fspath(builder.data_dir)


def _restore_file_formats(info) -> None:
    """Makes `info` list the alternative file formats its `dataset_info.json`
    records (e.g. ArrayRecord added by `prepare_tfds`).

    TFDS 4.9.10 restores them into a code-defined builder's proto (`stl10`,
    `cifar10`) but not into `info.alternative_file_formats`, which
    `as_data_source` reads: without this, a data set converted in place stays
    "TFRecord only" for those builders.
    """
    from tensorflow_datasets.core import file_adapters

    for value in info.as_proto.alternative_file_formats:
        file_format = file_adapters.FileFormat(value)
        if file_format not in info.alternative_file_formats:
            info.alternative_file_formats.append(file_format)  # the list itself


def _check_key(features, key: str, argument: str, name: str) -> None:
    if key not in features:
        raise ValueError(f"{argument}={key!r} is not a feature of TFDS data set {name!r}: its "
                         f"features are {', '.join(sorted(features.keys()))}.")


def _unknown_split_message(split: str, name: str, splits: dict[str, int], reason: str) -> str:
    """One line for a split expression TFDS refused: the available splits with
    their sizes, and a close name for each unknown word."""
    available = ", ".join(f"{s} ({n})" for s, n in splits.items()) or "none recorded"
    words = [w for w in re.findall(r"[A-Za-z_][\w\-]*", split) if w not in splits]
    close = [f"{m[0]!r} for {w!r}" for w in words
             if (m := difflib.get_close_matches(w, list(splits), n=1))]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"split={split!r} is not a split expression of TFDS data set {name!r} "
            f"({reason.rstrip('.')}); "
            f"its splits are {available}{hint}. Expressions: 'train', 'train+unlabelled', "
            "'train[:10%]', 'test[1000:]'.")


class TFDSSource(ImageSource):
    """A TFDS split, read by index from ArrayRecord files, as uint8 images.

    Args:
        name: a TFDS data set name (`"stl10"`, `"cifar10"`, `"cifar10:3.0.2"`).
        split: any TFDS split expression: `"train"`, `"train+unlabelled"`
            (STL-10's pre-training set), `"train[:10%]"`, `"test[1000:]"`.
        data_dir: where the data set is prepared; default TFDS' own
            (`~/tensorflow_datasets`, or `$TFDS_DATA_DIR`).
        download: let TFDS download and prepare it (as ArrayRecord) when it is
            not prepared in `data_dir`. Without it, nothing is downloaded.
        image_key: the image feature (`tfds.features.Image`, uint8).
        label_key: the label feature, or None for no labels.
        image_size: `int` or `(height, width)`: images are resized to it when
            their size differs (bilinear with antialiasing, as
            `ImageFolderSource`). Default: the data set's fixed image shape; a
            data set of images of varying size needs it.

    Labels are read on first use of `labels` (one pass over the records,
    images not decoded: 53 µs per record measured, ≈ 5.5 s at N = 105k;
    `from_sources`, hence the command line, reads them when the data set is
    built, for evaluation and `--train_size`). Training never uses them. An example without a label
    (STL-10 `unlabelled`: -1) keeps `NO_LABEL` (-1): evaluation must use only
    labels ≥ 0. `labels` is None when the split has none at all (or
    `label_key` is None). `num_classes` comes from the label feature.

    Raises:
        ValueError: one line naming the argument: an unknown `name`, a `split`
            that does not exist or selects no example (the available splits
            named), a data set not prepared in `data_dir` without `download`
            (how to prepare it), one prepared as TFRecord only (the command
            converting it), an `image_key`/`label_key` that is not a feature
            (the features named), a bad `image_size`, or images of varying
            size without `image_size`.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        download: bool = False,
        image_key: str = "image",
        label_key: str | None = "label",
        image_size: int | tuple[int, int] | None = None,
    ):
        tfds = _import_tfds()
        if not isinstance(split, str) or not split.strip():
            raise ValueError(f"split must be a TFDS split expression such as 'train' or "
                             f"'train+unlabelled'; got {split!r}.")
        data_dir = None if data_dir is None else os.fspath(data_dir)
        size = _check_image_size(image_size, f"TFDS data set {name!r}")
        builder = _builder(tfds, name, data_dir)
        _ensure_prepared(builder, name, data_dir, download)
        features = builder.info.features
        _check_key(features, image_key, "image_key", name)
        if label_key is not None:
            _check_key(features, label_key, "label_key", name)
        self.name = name
        self.split = split
        self.data_dir = data_dir
        self.image_key = image_key
        self.label_key = label_key
        self.version = str(builder.info.version)
        self._builder = builder
        self._data_source = self._open(builder, {})
        self.num_images = self._count()
        self._stored_shape = self._image_shape(features[image_key])
        self._fixed_size = None not in self._stored_shape[:2]
        height, width = size or self._stored_shape[:2]
        if not (size or self._fixed_size):
            raise ValueError(f"TFDS data set {name!r} holds images of varying size "
                             f"({image_key!r} has shape {features[image_key].shape}): pass "
                             "image_size (--image_size) to resize them to one size.")
        self.image_shape = (int(height), int(width), int(self._stored_shape[2]))
        self.dtype = tf.uint8
        self._labels: Any = _NOT_READ
        self._fingerprint = fingerprint_of(["tfds", builder.info.full_name, split, image_key,
                                            str(self.num_images)])

    # -- opening ----------------------------------------------------------

    def _open(self, builder, decoders: dict):
        """`builder.as_data_source(split)` (what `tfds.data_source` returns),
        its errors turned into one line."""
        _restore_file_formats(builder.info)
        try:
            return builder.as_data_source(split=self.split, decoders=decoders or None)
        except NotImplementedError:  # no random-access format prepared
            raise ValueError(
                f"TFDS data set {self.name!r} in {builder.data_dir} is stored as TFRecord, "
                "which can only be streamed, not read by sample index: convert it once with "
                f"`{_prepare_command(self.name, self.data_dir)}` (adds ArrayRecord files "
                "next to the TFRecord ones).") from None
        except (ValueError, AssertionError, KeyError) as error:  # tfds' split parsing
            raise ValueError(self._split_message(_first_line(error))) from None

    def _count(self) -> int:
        """N, refusing a split expression that selects nothing."""
        try:
            count = len(self._data_source)
        except ValueError:  # an inverted slice: tfds gives a negative length
            count = 0
        if count <= 0:
            raise ValueError(self._split_message("it selects no example"))
        return int(count)

    def _split_message(self, reason: str) -> str:
        splits = {name: int(info.num_examples)
                  for name, info in self._builder.info.splits.items()}
        return _unknown_split_message(self.split, self.name, splits, reason)

    def _image_shape(self, feature) -> tuple[int | None, int | None, int]:
        """The stored `(height, width, channels)`; a one-line error for what
        is not an 8-bit image of 1 or 3 channels."""
        shape = tuple(getattr(feature, "shape", ()) or ())
        dtype = getattr(feature, "np_dtype", None)
        if len(shape) != 3 or shape[2] not in (1, 3) or dtype != np.uint8:
            raise ValueError(f"image_key={self.image_key!r} of TFDS data set {self.name!r} is "
                             f"not an 8-bit image of 1 or 3 channels (shape {shape}, dtype "
                             f"{dtype}); pass the image feature's key.")
        return shape

    # -- the source -------------------------------------------------------

    @property
    def labels(self) -> np.ndarray | None:
        """int64 `[N]` labels (-1: none), None when the split has no label at
        all or `label_key` is None. Read on first use (one pass over the
        records, images not decoded)."""
        if self._labels is _NOT_READ:
            self._labels = self._read_labels()
        return self._labels

    def _read_labels(self) -> np.ndarray | None:
        if self.label_key is None:
            return None
        tfds = _import_tfds()
        records = self._open(self._builder, {self.image_key: tfds.decode.SkipDecoding()})
        try:
            labels = np.fromiter((records[i][self.label_key] for i in range(self.num_images)),
                                 np.int64, count=self.num_images)
        except Exception as error:  # e.g. a missing or truncated ArrayRecord shard
            raise ValueError(
                f"TFDS data set {self.name!r} split {self.split!r} cannot be read "
                f"({type(error).__name__}: {_first_line(error)[:200]}): its files are damaged "
                f"or missing; prepare it again with "
                f"`{_prepare_command(self.name, self.data_dir)}`.") from None
        return None if np.all(labels == NO_LABEL) else labels

    @property
    def num_classes(self) -> int | None:
        """The label feature's number of classes (a `ClassLabel`'s), else the
        largest label + 1; None without labels."""
        if self.label_key is None:
            return None
        classes = getattr(self._builder.info.features[self.label_key], "num_classes", None)
        return int(classes) if classes else super().num_classes

    def _check_range(self, index: np.ndarray) -> None:
        if index.size and (index.min() < 0 or index.max() >= self.num_images):
            raise IndexError(f"{self.name} {self.split}: sample index out of range "
                             f"[0, {self.num_images}): got {index.min()}..{index.max()}.")

    def _images(self, index: np.ndarray) -> list[np.ndarray]:
        """Records `index`, decoded by TFDS: uint8 `[h, w, C]` each. A record that
        cannot be read raises an error carrying `READ_FAILED_MESSAGE`, this
        source's fingerprint and the record (see `read_error`)."""
        self._check_range(index)
        images = []
        for i in index:
            try:
                images.append(self._data_source[int(i)][self.image_key])
            except Exception as error:  # ArrayRecord/TFDS raise many types
                raise RuntimeError(f"{READ_FAILED_MESSAGE} source {self._fingerprint} record "
                                   f"{int(i)}: {_first_line(error)[:200]}") from None
        return images

    def read_error(self, error: BaseException) -> str | None:
        """One line for a record this source failed to read (found by the
        fingerprint in the error), else None."""
        match = re.search(re.escape(READ_FAILED_MESSAGE) + r" source ([0-9a-f]{16}) record "
                          r"(\d+): ([^\n]*)", str(error))
        if match is None or match.group(1) != self._fingerprint:
            return None
        return (f"TFDS data set {self.name!r} split {self.split!r}: record {match.group(2)} "
                f"cannot be read ({match.group(3).strip()}): its files are damaged or changed; "
                f"prepare it again with `{_prepare_command(self.name, self.data_dir)}`.")

    def _read_stacked(self, index: np.ndarray) -> np.ndarray:
        images = self._images(index)
        if not images:
            return np.zeros([0, *self._stored_shape], np.uint8)
        return np.stack(images)

    def _read_flat(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images of varying size as one flat uint8 array and their `[B, 3]` shapes."""
        images = self._images(index)
        shapes = np.array([image.shape for image in images], np.int64).reshape(-1, 3)
        flat = (np.concatenate([image.reshape(-1) for image in images]) if images
                else np.zeros([0], np.uint8))
        return flat, shapes

    def read(self, index: tf.Tensor) -> tf.Tensor:
        """Images `index` (int64 `[B]`) as uint8 `[B, H, W, C]`.

        The B records are read and decoded by TFDS in `tf.numpy_function`
        (call it in `tf.data.Dataset.map` with `num_parallel_calls`: the
        calls run in parallel); images are resized in the graph when their
        size is not `image_shape`'s.
        """
        index = tf.cast(index, tf.int64)
        height, width, channels = self.image_shape
        if self._fixed_size:
            images = tf.numpy_function(self._read_stacked, [index], tf.uint8, stateful=False,
                                       name="tfds_source_read")
            images = tf.ensure_shape(images, [index.shape[0], *self._stored_shape])
            if self._stored_shape[:2] != (height, width):
                images = resize_image(images, height, width)
        else:
            flat, shapes = tf.numpy_function(self._read_flat, [index], [tf.uint8, tf.int64],
                                             stateful=False, name="tfds_source_read")
            pieces = tf.RaggedTensor.from_row_lengths(flat, tf.reduce_prod(shapes, axis=1))
            images = tf.map_fn(
                lambda i: resize_image(tf.reshape(pieces[i], shapes[i]), height, width),
                tf.range(tf.shape(shapes, out_type=tf.int64)[0]),
                fn_output_signature=tf.TensorSpec([None, None, channels], tf.uint8))
        return tf.ensure_shape(images, [index.shape[0], height, width, channels])

    def fingerprint(self) -> str:
        """The data set's full name (name, config, version), the split
        expression, the image key and N: a changed split or data set version
        is refused by `--resume`."""
        return self._fingerprint

    def __repr__(self) -> str:
        return (f"TFDSSource(name={self.name!r}, split={self.split!r}, version={self.version}, "
                f"num_images={self.num_images}, image_shape={self.image_shape})")
