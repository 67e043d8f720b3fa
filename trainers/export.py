r"""Export a training run's encoder as the next SavedModel version for TF Serving.

    python -m trainers.export --checkpoint_dir=checkpoints/emc2
    python -m trainers.export --checkpoint_dir=checkpoints/emc2 --checkpoint=checkpoints/emc2/ckpt-440 \
        --export_dir=savedmodels --model_name=emc2

Writes `<export_dir>/<model_name>/<next version>/` (`saved_model.pb`,
`variables/`, signature `serving_default`: `images` → L2-normalised
`embedding`), staged in a hidden folder and renamed into place. Prints the
version's path and an `export: {...}` JSON line. `--export_dir` defaults to
the run's own (recorded in its flags.txt; a relative one is taken from the
current folder), so the version lands beside the one the trainer exported.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from trainers.common import (  # noqa: E402
    check_output_dirs,
    define_checkpoint_flags,
    fail as _fail,
    load_trained_run,
    model_name,
)
from trainers.run_flags import read_flags_file  # noqa: E402

PROGRAM = "export"
FLAGS = flags.FLAGS
define_checkpoint_flags()
flags.DEFINE_string("export_dir", None,
                    "Export root (TF Serving layout); default the run's --export_dir (its "
                    "flags.txt), savedmodels if it records none.")
flags.DEFINE_string("model_name", None, "Exported model's name; default the run's --model_name.")
flags.mark_flag_as_required("checkpoint_dir")


def fail(message: str):
    _fail(PROGRAM, message)


def run_export_dir(directory: str) -> str | None:
    """`--export_dir` if given, else the one the run recorded in its flags.txt
    (train's default, savedmodels, if it records none).

    Issue 19: the exporter wrote under `./savedmodels` whatever the run's
    `--export_dir` was, so a model server watching the run's folder never
    saw the new version. None if flags.txt cannot be read (`load_trained_run`
    then stops with one line).
    """
    if FLAGS.export_dir is not None:
        return FLAGS.export_dir
    try:
        return read_flags_file(directory).export_dir
    except (FileNotFoundError, ValueError):
        return None


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    logging.set_verbosity(logging.WARNING)
    import emc2_tf

    export_dir = run_export_dir(FLAGS.checkpoint_dir)
    if export_dir is not None:  # issue 13: unwritable is one line before anything is loaded
        check_output_dirs(PROGRAM, [("export_dir", export_dir, export_dir)])
    run_flags, run, path = load_trained_run(PROGRAM, FLAGS.checkpoint_dir, FLAGS.checkpoint)
    export_dir = export_dir or run_flags.export_dir
    name = FLAGS.model_name or model_name(run_flags)
    try:  # load_trained_run has refused non-finite weights
        export_path = emc2_tf.export_encoder(run.encoder, export_dir, name)
    except (OSError, ValueError) as error:
        fail(f"--export_dir={export_dir}: {error}")
    print(f"exported encoder: {export_path}")
    print("export: " + json.dumps({"checkpoint": path, "export_path": export_path,
                                   "global_step": int(run.model.optimizer.iterations.numpy())},
                                  sort_keys=True))


def cli() -> None:
    """The `emc2-export` console script (pyproject.toml): parses the flags, runs `main`."""
    from trainers.cli import run

    run(main, __doc__)


if __name__ == "__main__":  # python -m trainers.export
    cli()
