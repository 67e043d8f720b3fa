"""`trainers.train --resume` restores the flags of the first run that it is not given."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a subprocess: trainers.train defines its flags on absl's global FLAGS.
SCRIPT = r"""
import json, sys
from trainers import train
from trainers.run_flags import flags_file_text, write_flags_file

directory = sys.argv[1]
train.FLAGS(["train", "--noexport", "--projector", "--jit_compile", "--epochs=2",
             "--eval_every=0", "--batch_size=32", f"--checkpoint_dir={directory}"])
write_flags_file(directory, flags_file_text(train.FLAGS, train.run_flag_names()))  # as train does
train.FLAGS.unparse_flags()
train.FLAGS(["train", "--resume", f"--checkpoint_dir={directory}", "--epochs=5"])
train.take_saved_flags(directory)
print(json.dumps({name: train.FLAGS[name].value for name in
                  ("export", "projector", "jit_compile", "epochs", "eval_every", "batch_size",
                   "checkpoint_dir")}))
"""


def test_resume_keeps_the_first_runs_export_projector_and_jit_flags(tmp_path):
    """Bug caught: `--resume` dropping a flag of the first run that is not
    run-defining and not given again: `--export=false` came back as true (the
    resumed run exported an encoder the first run was told not to export), and
    likewise `--projector`, `--jit_compile`. A flag given again (`--epochs`) wins."""
    directory = str(tmp_path / "ck")
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", SCRIPT, directory], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "export": False, "projector": True, "jit_compile": True, "epochs": 5,
        "eval_every": 0, "batch_size": 32, "checkpoint_dir": directory}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
