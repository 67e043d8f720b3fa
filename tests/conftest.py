"""Shared test set-up: quiet TensorFlow's C++ log, import the package from the checkout."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-heavy", action="store_true",
                     help="also run tests marked heavy (real data sets, long runs)")


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: opt-in check on real data or long runs (--run-heavy)")
    # Keras' convert_to_numpy calls np.array(variable) without `copy`: NumPy 2 warns, harmlessly.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-heavy"):
        return
    skip = pytest.mark.skip(reason="heavy: opt in with `make test-all` (pytest --run-heavy)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
