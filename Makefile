# Two commands do all the set-up on a fresh machine:
#   make demo   pre-train EMC² on digits, evaluate, export to savedmodels/
#   make test   run the test suite (what CI runs)
# Both create .venv and install requirements.txt on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bazel-test clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m trainers.train --method=emc2 --dataset=digits --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -rs tests
	@$(MAKE) --no-print-directory bazel-test

# The same test files as Bazel py_tests, offline (WORKSPACE, .bazelrc);
# skipped with a reason where bazel is not installed.
bazel-test: $(STAMP)
	@if command -v bazel >/dev/null 2>&1 && [ -d /usr/share/bazel/rules/java ] \
			&& [ -d /usr/share/bazel/platforms ]; then \
		bazel test //... ; \
	else \
		echo "bazel-test: skipped: bazel (with Debian's rules) is not installed:" \
		     "apt-get install bazel-bootstrap bazel-rules-java bazel-platforms"; \
	fi

# Also the opt-in heavy / real-data checks (e.g. Fashion-MNIST idx files).
test-all: $(STAMP)
	$(PY) -m pytest -q -rs tests --run-heavy

clean:
	rm -rf $(VENV) runs checkpoints .pytest_cache
	-command -v bazel >/dev/null 2>&1 && bazel clean --expunge
