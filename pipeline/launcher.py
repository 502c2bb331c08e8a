"""The ``factorize`` console script's first step: hand ``factorize run`` to the lasting
server's warm runner when one runs (:func:`pipeline.lifetime.run_warm`, see
:mod:`flows.runner`), else run the command here (:func:`pipeline.cli.main`).

Kept to the standard library and :mod:`pipeline.lifetime`: a run handed over pays only
for starting Python and this module (about 0.1 s), not for the CLI's imports.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline.lifetime import run_warm

# Options of the ``factorize`` parser that take a value (before the subcommand).
_OPTIONS_WITH_VALUE = ("--log-level",)


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (``None`` when it names none): its first argument
    that is neither an option nor an option's value."""
    args = iter(argv)
    for arg in args:
        if arg in _OPTIONS_WITH_VALUE:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def entry(argv: Sequence[str] | None = None) -> int:
    """The ``factorize`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command_of(argv) == "run":
        code = run_warm(argv)
        if code is not None:
            return code
    from pipeline.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(entry())
