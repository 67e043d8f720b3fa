"""The test suite's layout: one suite for `make test`, and the same tests under Bazel.

`make test` (the README's test command, what `.ci/run` calls) runs pytest on
`tests/`; `make bazel-test` runs each `tests/test_*.py` as a Bazel `py_test`,
which executes the file as a script (`python tests/test_x.py`, the `main` of
its py_test). A file runs its tests that way only through its `__main__`
block, `sys.exit(pytest.main([__file__, *sys.argv[1:]]))`; without one, the
script defines its tests, runs none, exits 0, and Bazel reports PASSED.
`bazel run //:train` runs a program inside Bazel's output base; the trainers
then write where the user ran Bazel (`BUILD_WORKING_DIRECTORY`).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, run_python

TESTS = Path(ROOT, "tests")
#: The exit status the stand-in for pytest.main returns: a script must exit with it.
FAILED = int(pytest.ExitCode.TESTS_FAILED)
#: The real `pytest.main` (bazel_script_collection puts a stand-in in its place).
PYTEST_MAIN = pytest.main


def _test_files() -> list[str]:
    return sorted(path.name for path in TESTS.glob("test_*.py"))


def _collect(args: list[str]) -> tuple[list[str], int]:
    """pytest's collection for `args` in this process: (`file::test` ids, exit status)."""

    class Collected:
        ids: list[str] = []

        def pytest_collection_finish(self, session):
            self.ids = [item.nodeid for item in session.items]

    collected = Collected()
    status = PYTEST_MAIN([*args, "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-p", "no:unraisableexception"],
                         plugins=[collected])
    ids = [node.partition("::") for node in collected.ids]
    return [f"{os.path.basename(path)}::{test}" for path, _, test in ids], int(status)


def bazel_script_collection() -> None:
    """Prints, as JSON, what each test file runs as Bazel runs it and what pytest collects.

    Run in a child process (`python -c`): every file is executed as a script,
    as Bazel's py_test runs it (`__main__`, `sys.argv = [file, "-rs"]` for
    `--test_arg=-rs`), with `pytest.main` replaced by a stand-in that only
    collects what the script asked it to run and returns `FAILED`. So no test
    runs, a `__main__` block that ignores `sys.argv` is measured all the same,
    and the script's exit status shows whether it hands pytest's on. Then
    pytest collects `tests/` as `make test` does. One process for all files:
    TensorFlow is imported once.
    """
    import runpy

    scripts = {}
    for name in _test_files():
        asked = []

        def stand_in(args=None, plugins=None, asked=asked):
            asked.append(_collect(list(args or [])))
            return FAILED

        path = str(TESTS / name)
        sys.argv = [path, "-rs"]
        pytest.main, status = stand_in, 0
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as stop:
            status = stop.code
        finally:
            pytest.main = PYTEST_MAIN
        scripts[name] = {"runs": [test for ids, _ in asked for test in ids],
                         "collect_status": [code for _, code in asked], "exit_status": status}
    suite, status = _collect([str(TESTS)])
    print("collection: " + json.dumps({"scripts": scripts, "suite": suite, "status": status}))


def test_every_test_file_runs_its_tests_when_run_as_bazel_runs_it():
    """Bug caught: a test file without a `__main__` block (tests/test_keras_conventions.py
    had none) runs 0 tests under Bazel, which runs each file as a script, and
    Bazel reports PASSED; also a block that runs a subset (a `-k`, another
    file) or drops pytest's exit status (failures reported as PASSED). Each
    file, run as a script, must ask pytest for exactly the tests that pytest
    collects from it in `make test`, once, and exit with pytest's status."""
    result = run_python(["-c", "import sys; sys.path.insert(0, 'tests'); "
                               "import test_suite_layout; test_suite_layout.bazel_script_collection()"])
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(re.search(r"^collection: (.*)$", result.stdout, re.M).group(1))
    assert found["status"] == 0 and found["suite"], found["status"]
    expected = {name: sorted(test for test in found["suite"] if test.startswith(name + "::"))
                for name in _test_files()}
    assert {name for name, tests in expected.items() if tests} == set(_test_files())
    for name, script in found["scripts"].items():
        assert sorted(script["runs"]) == expected[name], (
            f"{name} run as a script asks pytest for {len(script['runs'])} tests; "
            f"pytest collects {len(expected[name])} (its __main__ block?)")
        assert script["collect_status"] == [0], (name, script["collect_status"])
        assert script["exit_status"] == FAILED, (name, script["exit_status"])


def _build_rules() -> list[tuple[str, dict]]:
    """BUILD's rules as (kind, attributes): BUILD evaluated as Python, with recording
    stand-ins for Bazel's native rules and a `glob` over the checkout (BUILD uses
    only Starlark that is also Python: calls, lists, comprehensions)."""
    rules = []

    def rule(kind):
        return lambda **attributes: rules.append((kind, attributes))

    def glob(include, exclude=()):
        def matches(patterns):
            return {str(path.relative_to(ROOT)) for pattern in patterns
                    for path in Path(ROOT).glob(pattern) if path.is_file()}

        return sorted(matches(include) - matches(exclude))

    namespace = {"glob": glob, "package": lambda **_: None,
                 **{kind: rule(kind) for kind in ("py_library", "py_binary", "py_test")}}
    source = Path(ROOT, "BUILD").read_text(encoding="utf-8")
    exec(compile(source, "BUILD", "exec"), namespace)  # noqa: S102 (the checkout's own BUILD)
    return rules


def test_build_has_a_py_test_for_every_test_file():
    """Bug caught: a test file that Bazel never runs (no py_test: a BUILD glob or
    exclude that misses it), a py_test whose `main` is another file, and a
    helper module in tests/ (e.g. a worker script a test starts) missing from
    the py_tests' runfiles, so that the test fails under Bazel only."""
    rules = _build_rules()
    tests = [attributes for kind, attributes in rules if kind == "py_test"]
    files = [f"tests/{name}" for name in _test_files()]
    assert sorted(src for test in tests for src in test["srcs"]) == files
    for test in tests:
        (src,) = test["srcs"]
        assert test["main"] == src and test["name"] == Path(src).stem, test
        assert ":test_helpers" in test["deps"], test
    (helpers,) = [attributes for kind, attributes in rules
                  if kind == "py_library" and attributes["name"] == "test_helpers"]
    modules = sorted(f"tests/{path.name}" for path in TESTS.glob("*.py")
                     if not path.name.startswith("test_"))
    assert sorted(helpers["srcs"]) == modules


def test_make_test_runs_pytest_also_where_bazel_is_installed(tmp_path):
    """Bug caught: `make test` switching to `bazel test //...` when Bazel is
    installed, so that the README's one test command ran two different suites
    on two machines. Here a `bazel` is on PATH and the Makefile's own check
    for Debian's Bazel is forced to yes (BAZEL_OK=yes); `make test` must still
    run exactly pytest on tests/, and `make bazel-test` Bazel."""
    fake = tmp_path / "bazel"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def commands(target):
        # -o: the venv counts as installed (its recipe is not what is tested).
        result = subprocess.run(["make", "-n", "-s", "-o", ".venv/.installed", target,
                                 "BAZEL_OK=yes"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if line.strip()]

    pytest_command = ".venv/bin/python -m pytest -q -rs -n auto --dist worksteal tests"
    assert commands("test") == [pytest_command]
    assert commands("pytest") == [pytest_command]
    assert commands("bazel-test") == ["bazel test //... --test_arg=-rs"]


def test_bazel_run_writes_where_the_user_ran_bazel(tmp_path):
    """Bug caught: under `bazel run //:train` the trainers wrote `checkpoints/...`
    and `savedmodels/...` inside Bazel's output base (the runfiles folder is
    the working directory), where `make clean` deleted them. `trainers.cli.run`,
    which all three programs start through, must change to
    `BUILD_WORKING_DIRECTORY` first, and stay put when it is not set."""
    user, runfiles = tmp_path / "user", tmp_path / "runfiles"
    user.mkdir()
    runfiles.mkdir()
    program = ("from trainers.cli import run\n"
               "run(lambda argv: open('written.txt', 'w').close(), None)\n")
    for bazel_run, where in ((True, user), (False, runfiles)):
        env = dict(os.environ, PYTHONPATH=ROOT)
        env.pop("BUILD_WORKING_DIRECTORY", None)
        if bazel_run:
            env["BUILD_WORKING_DIRECTORY"] = str(user)
        result = subprocess.run([sys.executable, "-c", program], cwd=runfiles, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (where / "written.txt").is_file(), (bazel_run, os.listdir(runfiles))
        assert sorted(os.listdir(user)) + sorted(os.listdir(runfiles)) == ["written.txt"]
        (where / "written.txt").unlink()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
