"""The project's own errors, and the one error boundary every console script runs inside.

`PLDRError` is the base of every error whose message is written for the user: it says what
is wrong, which file, and the fix (ConfigError, ShardError, CorpusError, TokenizerError,
CheckpointError, FingerprintError, UnsafePickleError, LayoutError, UnsupportedLayout,
LaunchError, InputError). `cli_main("pldr-<tool>")` wraps a console script's `main(argv)`:
such an error prints one line, `pldr-<tool>: error: <message>`, on stderr and exits with 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys

EXIT_USER_ERROR = 2


class PLDRError(Exception):
    """An error the user can fix; its message names the file and the fix."""


class InputError(PLDRError, ValueError):
    """A command-line argument or input file that fits no narrower error type."""


def error_line(prog: str, err: BaseException) -> str:
    """`prog: error: message` on one line (a leading "ShardError: "-style tag is dropped)."""
    text = str(err).strip() or type(err).__name__
    for cls in type(err).__mro__:
        tag = f"{cls.__name__}: "
        if text.startswith(tag):
            text = text[len(tag):]
            break
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    return f"{prog}: error: {text}"


def report(prog: str, err: BaseException) -> None:
    sys.stdout.flush()
    print(error_line(prog, err), file=sys.stderr, flush=True)


def cli_main(prog: str):
    """Decorator for a console script's main(argv=None): PLDRError -> one line, exit 2."""
    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv=None):
            try:
                return main(argv)
            except PLDRError as err:
                report(prog, err)
                raise SystemExit(EXIT_USER_ERROR) from None
        wrapper.__pldr_prog__ = prog
        return wrapper
    return decorate
