# Two commands do all the set-up on a fresh machine:
#   make demo   pre-train EMC² on digits, evaluate, export to savedmodels/
#   make test   run the test suite (what CI runs)
# Both create .venv and install requirements.txt on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test pytest test-all bazel-test clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m trainers.train --method=emc2 --dataset=digits --overwrite

# pytest runs the tests on one worker process per core (pytest-xdist), the
# tests handed out in chunks and stolen by an idle worker, so no file runs alone at the end.
PYTEST := $(PY) -m pytest -q -rs -n auto --dist worksteal

# `make test` (the README's test command, what .ci/run calls) is always this
# one suite, pytest with xdist, whether or not Bazel is installed.
test: $(STAMP)
	$(PYTEST) tests

# An alias of `make test`, for those used to it.
pytest: test

# The same test files as Bazel py_tests (one file at a time: slower), for
# those who build with Bazel; needs Bazel with Debian's rules.
BAZEL_OK := $(shell command -v bazel >/dev/null 2>&1 && [ -d /usr/share/bazel/rules/java ] \
	&& [ -d /usr/share/bazel/platforms ] && echo yes)

bazel-test: $(STAMP)
ifneq ($(BAZEL_OK),yes)
	@echo "make bazel-test: needs bazel with Debian's rules:" \
	      "apt-get install bazel-bootstrap bazel-rules-java bazel-platforms" >&2; exit 2
endif
	bazel test //... --test_arg=-rs

# Also the opt-in heavy / real-data checks (e.g. Fashion-MNIST idx files).
test-all: $(STAMP)
	$(PYTEST) tests --run-heavy

clean:
	rm -rf $(VENV) runs checkpoints .pytest_cache
	-command -v bazel >/dev/null 2>&1 && bazel clean --expunge
