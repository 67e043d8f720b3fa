"""EMC²'s `evaluate` gives the same value on one device and on two mirrored replicas.

The run happens in a subprocess (`tests/evaluate_replicas_worker.py`):
splitting the CPU into logical devices must precede TensorFlow's
initialisation.
"""

import json
import os
import sys

import numpy as np
import pytest

from helpers import ROOT, run_python

WORKER = os.path.join(ROOT, "tests", "evaluate_replicas_worker.py")


def test_evaluate_is_the_same_on_one_device_and_two_replicas(tmp_path):
    """Same weights, same fixed held-out pairs: `evaluate`'s loss and
    acceptance rate on 2 mirrored replicas equal the 1-device values to float
    round-off, for the default EMC² and for "reencode" with the exact ratio.

    Catches (issue 19): every replica drawing the same evaluation uniforms
    for its b chains (the draw not split by global chain position), which
    moved the held-out loss by ~3 % between 1 and 2 replicas; a replica
    scanning only its own images' candidates in `test_step`.
    """
    out = tmp_path / "evaluate.json"
    result = run_python([WORKER, str(out)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert set(runs) == {"default", "reencode_exact"}
    for variant, run in runs.items():
        one, two = run["default"], run["mirrored"]
        assert run["same_weights"], variant
        assert (one["replicas"], two["replicas"]) == (1, 2), variant
        # Not vacuous: the chains move, and some proposals are rejected.
        assert 0.2 < one["acceptance_rate"] < 0.9, variant
        for name in ("loss", "acceptance_rate", "out_of_batch_fraction"):
            np.testing.assert_allclose(two[name], one[name], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{variant}: {name}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
