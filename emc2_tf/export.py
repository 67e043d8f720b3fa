"""Export a trained encoder as a SavedModel in TF Serving's layout.

Layout: `<export_dir>/<model_name>/<version>/` holding `saved_model.pb` and
`variables/`; `version` is the next integer after the highest present (TF
Serving serves the highest). The version is written into a hidden temporary
folder beside it and renamed into place, so a model server never sees a
half-written version; a staging folder left by a killed exporter is removed
by the next export. A failed write (a full disk) removes its staging folder
and raises one-line `OSError`; weights holding NaN or inf are refused
(`NonFiniteError`) before anything is written.

Serving contract: signature `serving_default` takes `images`, float32
`[batch, H, W, C]` with values in [0, 1], and returns `embedding`, float32
`[batch, D]`, L2-normalised. Only the encoder is exported: no chain state.

Invalid images give NaN, per image: an image holding any pixel that is NaN,
inf or outside [0, 1] gets an all-NaN embedding row, and the other images of
the request get exactly the embeddings they get alone (the encoder only sees
valid images: an invalid one is replaced by zeros before it and its row set
to NaN after). A client can never mistake the answer for a real embedding,
and one bad image does not fail a whole batch. Before this rule a NaN pixel
got a finite, unit-norm embedding (oneDNN dropped the NaN) and 0..255 pixels
a plausible one. Out-of-range pixels are not clipped: 0..255 pixels (the
usual client mistake, not dividing by 255) clipped to [0, 1] give a
near-binary image whose embedding looks valid but is wrong. The same rule
(`emc2_tf.checks`: `check_images` for arrays, `valid_image_mask` in the
graph) refuses such images where training data enters.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from emc2_tf.checks import valid_image_mask
from emc2_tf.safety import check_finite_variables

SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"


STAGING_PREFIX = ".tmp-export-"


def _remove_stale_staging(model_dir: str) -> None:
    """Deletes staging folders of exporters that died (killed mid-write).

    A staging folder is named `.tmp-export-<pid>-<random>`; TF Serving
    ignores it (not an integer), and it is removed once its process is gone.
    """
    for name in os.listdir(model_dir):
        if not name.startswith(STAGING_PREFIX):
            continue
        try:
            pid = int(name[len(STAGING_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours, or another user's live process


def existing_versions(model_dir: str) -> list[int]:
    """Integer version folders present under `<export_dir>/<model_name>`."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(name) for name in os.listdir(model_dir) if name.isdigit())


def embed_valid_images(encoder: keras.Model, images: tf.Tensor) -> tf.Tensor:
    """`encoder(images)` for valid images, an all-NaN row for each invalid one.

    Valid: every pixel finite and in [0, 1] (`valid_image_mask`). Invalid
    images are zeroed before the encoder, so they cannot disturb the others'
    embeddings, and their rows are NaN after it.
    """
    valid = valid_image_mask(images)
    safe = tf.where(valid[:, None, None, None], images, tf.zeros_like(images))
    embeddings = encoder(safe, training=False)
    return tf.where(valid[:, None], embeddings,
                    tf.fill(tf.shape(embeddings), tf.constant(float("nan"), embeddings.dtype)))


def _archive(encoder: keras.Model) -> keras.export.ExportArchive:
    """The serving contract: `serving_default(images)` → `{"embedding": ...}`."""
    input_shape = tuple(encoder.input_shape[1:])
    if len(input_shape) != 3 or None in input_shape:
        raise ValueError(
            f"export needs an encoder with a fixed image input (H, W, C); got {input_shape}."
        )
    # Issue 13: never export NaN or inf weights (they would be served silently).
    check_finite_variables(encoder.weights, "refusing to export the encoder")
    archive = keras.export.ExportArchive()
    archive.track(encoder)
    spec = tf.TensorSpec((None, *input_shape), tf.float32, name=INPUT_NAME)

    def serve(images):
        return {OUTPUT_NAME: embed_valid_images(encoder, images)}

    archive.add_endpoint(SIGNATURE, serve, input_signature=[spec])
    return archive


@contextlib.contextmanager
def _staged_saved_model(archive: keras.export.ExportArchive, parent: str, published: str):
    """Writes `archive` (see `_archive`) into a fresh hidden folder in `parent` and
    yields its path, for the caller to rename into place; whatever is left of
    it afterwards (a failed write, a failed rename) is removed.

    A failed write (a full disk) raises a one-line `OSError` that ends with
    `published`, what the reader still sees.
    """
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent)
    try:
        try:
            archive.write_out(staging, verbose=False)
        except (OSError, tf.errors.OpError) as error:  # e.g. a full disk: one line
            raise _write_error(error, parent, published) from None
        yield staging
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _write_error(error: Exception, where: str, published: str) -> OSError:
    """A one-line `OSError` for a failed SavedModel write."""
    reason = (error.strerror if isinstance(error, OSError) and error.strerror
              else (str(getattr(error, "message", error)).strip().splitlines() or ["?"])[0])
    message = f"cannot write the SavedModel for {where}: {reason}; {published}."
    code = getattr(error, "errno", None)
    return OSError(code, message) if code else OSError(message)


def write_saved_model(encoder: keras.Model, path: str) -> str:
    """Writes `encoder` as a SavedModel at `path` (which must not exist), atomically.

    The archive goes to a hidden temporary folder beside `path` and is renamed
    into place, so `path` is either absent or complete. `ContrastiveModel.export`
    uses it; `export_encoder` adds the versioned TF Serving layout.
    """
    archive = _archive(encoder)  # refuses non-finite weights before anything is written
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"export path {path} already exists; choose a new folder.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with _staged_saved_model(archive, parent, f"nothing was written at {path}") as staging:
        os.rename(staging, path)
    return path


def export_encoder(
    encoder: keras.Model, export_dir: str = "savedmodels", model_name: str = "emc2"
) -> str:
    """Writes `encoder` as the next version of `model_name`; returns its path."""
    if not model_name or os.sep in model_name or model_name.startswith("."):
        raise ValueError(f"model_name must be a plain folder name; got {model_name!r}.")
    archive = _archive(encoder)  # refuses non-finite weights before anything is written
    model_dir = os.path.join(export_dir, model_name)
    os.makedirs(model_dir, exist_ok=True)
    _remove_stale_staging(model_dir)
    versions = existing_versions(model_dir)
    published = (f"nothing was published (the highest version stays "
                 f"{versions[-1] if versions else 'none'})")
    with _staged_saved_model(archive, model_dir, published) as staging:
        while True:
            versions = existing_versions(model_dir)
            target = os.path.join(model_dir, str(versions[-1] + 1 if versions else 1))
            try:
                os.rename(staging, target)  # atomic on one file system
                return target
            except OSError:
                if not os.path.exists(target):
                    raise
                # Another exporter took that version number: try the next one.
