r"""Export a training run's encoder as the next SavedModel version for TF Serving.

    python -m trainers.export --checkpoint_dir=checkpoints/emc2
    python -m trainers.export --checkpoint_dir=checkpoints/emc2 --checkpoint=checkpoints/emc2/ckpt-440 \
        --export_dir=savedmodels --model_name=emc2

Writes `<export_dir>/<model_name>/<next version>/` (`saved_model.pb`,
`variables/`, signature `serving_default`: `images` → L2-normalised
`embedding`), staged in a hidden folder and renamed into place. Prints the
version's path and an `export: {...}` JSON line.
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

PROGRAM = "export"
FLAGS = flags.FLAGS
define_checkpoint_flags()
flags.DEFINE_string("export_dir", "savedmodels", "Export root (TF Serving layout).")
flags.DEFINE_string("model_name", None, "Exported model's name; default the run's --model_name.")
flags.mark_flag_as_required("checkpoint_dir")


def fail(message: str):
    _fail(PROGRAM, message)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    logging.set_verbosity(logging.WARNING)
    import emc2_tf

    # Issue 13: an unwritable --export_dir is one line before anything is loaded.
    check_output_dirs(PROGRAM, [("export_dir", FLAGS.export_dir, FLAGS.export_dir)])
    run_flags, run, path = load_trained_run(PROGRAM, FLAGS.checkpoint_dir, FLAGS.checkpoint)
    name = FLAGS.model_name or model_name(run_flags)
    try:  # load_trained_run has refused non-finite weights
        export_path = emc2_tf.export_encoder(run.encoder, FLAGS.export_dir, name)
    except (OSError, ValueError) as error:
        fail(f"--export_dir={FLAGS.export_dir}: {error}")
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
