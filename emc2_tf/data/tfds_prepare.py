"""Prepares a TFDS data set for `TFDSSource`: ArrayRecord files, read by index.

    python -m emc2_tf.data.tfds_prepare stl10 --data_dir=/data/tfds

Downloads and prepares the data set as ArrayRecord when it is not in
`--data_dir` (needs network; `--no_download` refuses instead), or converts a
data set prepared as TFRecord (TFDS' default) by writing ArrayRecord shards
next to the TFRecord ones. Prints the data set's folder. A separate module
from `tfds_source`, so `python -m` runs it without importing it twice.
"""

from __future__ import annotations

import argparse
import sys

from emc2_tf.data.tfds_source import prepare_tfds


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns its exit status (2 with one line on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m emc2_tf.data.tfds_prepare",
        description="Prepare a TFDS data set as ArrayRecord (random access by index).")
    parser.add_argument("name", help="TFDS data set name, e.g. stl10 or cifar10")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data_dir (default: TFDS' own, ~/tensorflow_datasets)")
    parser.add_argument("--no_download", action="store_true",
                        help="only convert a data set already prepared as TFRecord")
    args = parser.parse_args(argv)
    try:
        folder = prepare_tfds(args.name, args.data_dir, download=not args.no_download)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.name}: readable by index (ArrayRecord) in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
