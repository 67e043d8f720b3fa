"""What the three commands share as console scripts (pyproject.toml's
`emc2-train`, `emc2-evaluate`, `emc2-export`) and as `python -m trainers.<name>`.

Their `cli()` calls `run(main, __doc__)`, which is `absl.app.run(main)` with
two differences:
- `--help` prints the program's docstring also when `__main__` is pip's
  generated wrapper script (which has none);
- `--help` and `--helpfull` exit with status 0 (absl exits with 1), so that
  `emc2-train --help` counts as success in scripts, also when the reader
  stops early (`emc2-train --helpfull | head`: no BrokenPipeError traceback).
"""

from __future__ import annotations

import os
import sys

from absl import app

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


def run(main, doc: str | None) -> None:
    """`absl.app.run(main)`; `doc` is the program's module docstring, for `--help`."""
    main_module = sys.modules.get("__main__")
    if main_module is not None and not getattr(main_module, "__doc__", None):
        main_module.__doc__ = doc

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
