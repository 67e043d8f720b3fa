"""What the three commands share as console scripts (pyproject.toml's
`emc2-train`, `emc2-evaluate`, `emc2-export`) and as `python -m trainers.<name>`.

Their `cli()` calls `run(main, __doc__)`, which is `absl.app.run(main)` with
these differences:
- under `bazel run` (which runs the program inside Bazel's output base) it
  first changes to the folder the user ran Bazel from, so that relative paths
  (`checkpoints/...`, `savedmodels/...`) land there, not in a folder that
  `bazel clean --expunge` deletes;
- `--help` prints the program's docstring also when `__main__` is pip's
  generated wrapper script (which has none);
- `--help` and `--helpshort` list the program's flags also from pip's wrapper
  script and for flags defined by a shared helper (`trainers.common`,
  `trainers.run_flags`); absl lists only the flags that `sys.argv[0]` defines;
- `--help` and `--helpfull` exit with status 0 (absl exits with 1), so that
  `emc2-train --help` counts as success in scripts, also when the reader
  stops early (`emc2-train --helpfull | head`: no BrokenPipeError traceback).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

#: absl's help flags (`--help`, `-?`, `--helpshort`, `--helpfull`, `--helpxml`).
HELP_FLAGS = frozenset({"help", "?", "helpshort", "helpfull", "helpxml"})


def asked_for_help(argv) -> bool:
    """Whether the command line holds one of absl's help flags (before any `--`)."""
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg.startswith("-") and arg.lstrip("-").split("=", 1)[0] in HELP_FLAGS:
            return True
    return False


def change_to_bazel_working_directory() -> None:
    """Under `bazel run`, changes to the folder the user ran Bazel from.

    `bazel run //:train` starts the program in its runfiles tree, inside Bazel's
    output base: the relative paths it prints (`checkpoints/...`) would be
    written there, out of the user's sight, and `make clean` (`bazel clean
    --expunge`) would delete them. Bazel names the user's folder in
    `BUILD_WORKING_DIRECTORY` (set by `bazel run` only).
    """
    directory = os.environ.get("BUILD_WORKING_DIRECTORY")
    if directory and os.path.isdir(directory):
        os.chdir(directory)


def list_program_flags_in_short_help() -> None:
    """Makes `--help`/`--helpshort` list the program's flags.

    absl's short help lists the key flags of the module named `sys.argv[0]`.
    From pip's wrapper script (`emc2-export`) that is the wrapper, which
    defines no flags, so nothing was listed; and flags that a program defines
    through a shared helper (`define_checkpoint_flags`, `define_train_flags`)
    are key flags of the helper's module, so even `python -m trainers.train
    --help` listed none. Every flag defined in this package (the running
    program's, since the three programs cannot share a process) becomes a key
    flag of `sys.argv[0]`; `--helpfull` is unchanged.
    """
    package = __name__.split(".")[0] + "."
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
        if module.startswith(package):
            for flag in module_flags:
                flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main, doc: str | None) -> None:
    """`absl.app.run(main)`; `doc` is the program's module docstring, for `--help`."""
    change_to_bazel_working_directory()  # before any flag names a relative path
    main_module = sys.modules.get("__main__")
    if main_module is not None and not getattr(main_module, "__doc__", None):
        main_module.__doc__ = doc
    list_program_flags_in_short_help()

    def parse(argv):
        try:
            return app.parse_flags_with_usage(argv)
        except SystemExit as stop:
            if stop.code == 1 and asked_for_help(argv):  # the help was printed
                raise SystemExit(0) from None
            raise
        except BrokenPipeError:  # `--help | head`: the reader left before the end
            if not asked_for_help(argv):
                raise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error
            raise SystemExit(0) from None

    app.run(main, flags_parser=parse)
