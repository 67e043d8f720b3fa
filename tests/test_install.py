"""emc2-tf as an installed package: `pip install .` and `pip install -e .`.

Each install goes into a fresh virtual environment under `tmp_path`, from a
copy of the package's sources (so no `build/` or `*.egg-info` lands in the
checkout). The environment sees the project's own dependencies without
downloading anything: a `.pth` file in its site-packages names the
site-packages of the interpreter running the tests (.venv's; paths from
`sysconfig`), and pip runs offline (`--no-deps --no-build-isolation
--no-index`, building with .venv's setuptools). Every command then runs from
another, empty folder with `PYTHONPATH` unset, so only the installed package
can be imported.
"""

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # not helpers: no Keras

#: What pip needs to build the package: pyproject.toml, its readme, the packages.
SOURCES = ("pyproject.toml", "README.md", "emc2_tf", "trainers")
PACKAGES = ("emc2_tf", "trainers")
#: requirements.txt entries that are not runtime dependencies of the package.
NOT_RUNTIME = {"pytest": "test", "pytest-xdist": "test", "setuptools": "build"}
SCRIPTS = ("emc2-train", "emc2-evaluate", "emc2-export")


def _requirements() -> list[str]:
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as handle:
        lines = [line.split("#", 1)[0].strip() for line in handle]
    return [line for line in lines if line]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)["project"]


def test_pyproject_pins_are_requirements_txt_pins():
    """Bug caught: pyproject.toml and requirements.txt drifting apart (a pin bumped
    or a runtime package added in one file only), so that `pip install .` and
    `make setup` install different versions. The runtime entries of
    requirements.txt, in order, must be pyproject's `dependencies`; pytest and
    pytest-xdist are the `test` extra; setuptools (build only) is in neither."""
    requirements = _requirements()
    project = _project()
    runtime = [r for r in requirements if _name(r) not in NOT_RUNTIME]
    assert project["dependencies"] == runtime
    test_pins = [r for r in requirements if NOT_RUNTIME.get(_name(r)) == "test"]
    assert project["optional-dependencies"] == {"test": test_pins}
    assert {_name(r) for r in requirements} >= set(NOT_RUNTIME), requirements


def test_every_third_party_import_is_a_declared_dependency():
    """Bug caught: the installed package importing something it does not declare
    (it works in .venv, where requirements.txt or another package put it, and
    fails after `pip install emc2-tf`); and an unused dependency such as
    keras-cv coming back (nothing imports it: dropped on purpose, README)."""
    imported = set()
    for package in PACKAGES:
        for path in Path(ROOT, package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}
    declared = {_name(r) for r in _project()["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {module: distributions.get(module) for module in third_party
                  if not {_name(d) for d in distributions.get(module, [])} & declared}
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"
    assert "keras-cv" not in {_name(r) for r in _requirements()}
    assert not {"keras_cv", "keras_core"} & imported


def _environment() -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONNOUSERSITE="1", PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    return env


def _install(tmp: Path, editable: bool) -> dict:
    """A venv in `tmp` with emc2-tf installed from a copy of the sources."""
    source = tmp / "src"
    for name in SOURCES:
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, name), source / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    paths = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_path('purelib')); print(sysconfig.get_path('scripts'))"],
        check=True, capture_output=True, text=True, env=_environment()).stdout.split("\n")
    site, scripts = Path(paths[0]), Path(paths[1])
    # The project's dependencies (and pip, setuptools) from the running interpreter.
    dependencies = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "_emc2_tf_test_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    command = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
               "--no-build-isolation", "--no-index", *(["-e"] if editable else []), "."]
    result = subprocess.run(command, cwd=source, capture_output=True, text=True,
                            env=_environment(), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    elsewhere = tmp / "elsewhere"  # an empty folder: nothing importable from the cwd
    elsewhere.mkdir()
    return {"python": str(venv / "bin" / "python"), "site": site, "scripts": scripts,
            "source": source, "cwd": elsewhere}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return _install(tmp_path_factory.mktemp("install"), editable=False)


def _origins(install: dict) -> list[str]:
    """Where `import emc2_tf` / `import trainers` resolve (found, not executed)."""
    result = subprocess.run(
        [install["python"], "-c",
         "import importlib.util as u\nfor p in ('emc2_tf', 'trainers'): print(u.find_spec(p).origin)"],
        cwd=install["cwd"], capture_output=True, text=True, env=_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


def _relative_files(folder: Path) -> set:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


def test_pip_install_puts_every_module_into_site_packages(installed):
    """Bug caught: a package or subpackage left out of the install (e.g.
    `trainers`, or `emc2_tf.*` missing from pyproject's `packages.find`, which
    installs `emc2_tf/__init__.py` alone), a file that would need to be package
    data, and `import emc2_tf` resolving to the checkout instead of the install."""
    site = installed["site"]
    assert _origins(installed) == [str(site / "emc2_tf" / "__init__.py"),
                                   str(site / "trainers" / "__init__.py")]
    for package in PACKAGES:
        assert _relative_files(site / package) == _relative_files(installed["source"] / package)


def _run_scripts(install: dict, commands) -> list[subprocess.CompletedProcess]:
    """Runs the console scripts concurrently (each imports TensorFlow: seconds)."""
    processes = [subprocess.Popen([str(install["scripts"] / command[0]), *command[1:]],
                                  cwd=install["cwd"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=_environment())
                 for command in commands]
    results = []
    for command, process in zip(commands, processes):
        stdout, stderr = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


def test_console_scripts_run_the_absl_clis(installed):
    """Bug caught: a console script missing or pointing at the wrong callable
    (e.g. `trainers.train:main`, which needs `argv`: TypeError), a CLI module
    missing from the install, and `--help` exiting non-zero or, from pip's
    wrapper script, printing no usage text."""
    train, evaluate, export = _run_scripts(installed, [
        ["emc2-train", "--helpfull"], ["emc2-evaluate", "--help"], ["emc2-export", "--help"]])
    for result in (train, evaluate, export):
        assert result.returncode == 0, (result.args, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert train.stdout.startswith("Pre-train an encoder with a contrastive method")
    assert "--method: <cache|dcl|dhel|emc2|kcl|simclr|sogclr>" in train.stdout
    assert "--[no]export" in train.stdout and "--resume_from" in train.stdout
    assert evaluate.stdout.startswith("Evaluate a trained encoder")
    assert "Try --helpfull" in evaluate.stdout
    assert export.stdout.startswith("Export a training run's encoder")


#: Runs a console script as Python runs a script (`__main__`), once per flag in
#: argv[2:], and prints one JSON line per run: its exit status and stdout.
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
script = sys.argv[1]
for flag in sys.argv[2:]:
    sys.argv, out, status = [script, flag], io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            status = stop.code
    print(json.dumps({"flag": flag, "status": status, "stdout": out.getvalue()}))
"""


def test_console_scripts_short_help_lists_the_programs_flags(installed):
    """Bug caught: `emc2-export --help`, `emc2-evaluate --help` and `emc2-train
    --helpshort` listed no flags. absl's short help lists the flags of the
    module named `sys.argv[0]`, which for a console script is pip's wrapper
    (it defines none), and flags defined in a shared helper (`--checkpoint_dir`
    in trainers.common, every training flag in trainers.run_flags) were
    missing even from `python -m trainers.<name> --help`. Each installed
    script, run with `--help` and then `--helpshort` (one process per script),
    must list its own flags, and only those (no absl `--verbosity`)."""
    expected = {"emc2-train": ["--checkpoint_dir", "--method", "--temperature"],
                "emc2-evaluate": ["--checkpoint_dir", "--saved_model", "--output_json"],
                "emc2-export": ["--checkpoint", "--checkpoint_dir", "--export_dir"]}
    processes = {script: subprocess.Popen(
        [installed["python"], "-c", HELP_DRIVER, str(installed["scripts"] / script),
         "--help", "--helpshort"], cwd=installed["cwd"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=_environment()) for script in expected}
    for script, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (script, stderr[-3000:])
        runs = [json.loads(line) for line in stdout.splitlines()]
        assert [run["flag"] for run in runs] == ["--help", "--helpshort"], stdout[-3000:]
        for run in runs:
            assert run["status"] == 0, (script, run)
            listed = re.findall(r"^  (--(?:\[no\])?\w+)", run["stdout"], re.M)
            assert set(expected[script]) <= set(listed), (script, run["flag"], listed)
            assert "--verbosity" not in listed, (script, run["flag"])


def test_readme_python_example_runs_with_the_installed_package(installed):
    """Bug caught: the README's first Python example failing against the
    installed package from another folder (a name it uses missing from
    `emc2_tf`, a module left out of the install, a path relative to the
    checkout). The example is taken from README.md as it stands; the one
    substitution is `epochs=3` -> `epochs=1` in its `model.fit` call, to keep
    this test short (tests/test_cli.py runs it as written)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        example = re.search(r"```python\n(.*?)```", handle.read(), re.S).group(1)
    assert example.count("model.fit(dataset, epochs=3)") == 1, example
    script = example.replace("model.fit(dataset, epochs=3)", "model.fit(dataset, epochs=1, verbose=0)")
    result = subprocess.run([installed["python"], "-c", script], cwd=installed["cwd"],
                            capture_output=True, text=True, env=_environment(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^\{.*'knn_accuracy': [0-9.]+", result.stdout, re.M), result.stdout[-2000:]
    assert (installed["cwd"] / "savedmodels" / "my_encoder" / "1" / "saved_model.pb").is_file()


def test_editable_install_runs_from_the_sources(tmp_path):
    """Bug caught: `pip install -e .` failing (e.g. a build backend without PEP 660
    editable installs) or installing commands that cannot import their module;
    and an editable install that copies the package instead of importing the
    source tree (edits would not show)."""
    install = _install(tmp_path, editable=True)
    source = install["source"]
    assert _origins(install) == [str(source / "emc2_tf" / "__init__.py"),
                                 str(source / "trainers" / "__init__.py")]
    assert not (install["site"] / "emc2_tf").exists()
    (train,) = _run_scripts(install, [["emc2-train", "--helpfull"]])
    assert train.returncode == 0, train.stderr[-3000:]
    assert "--method: <cache|dcl|dhel|emc2|kcl|simclr|sogclr>" in train.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
