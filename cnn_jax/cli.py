"""What the command-line tools share: absl set-up and one-line errors for bad input."""

import contextlib
import sys
from typing import Callable, Iterator, List, Optional, Sequence

from absl import app, flags, logging


def setup(argv: Sequence[str]) -> None:
    """Reject stray positional arguments; keep absl's INFO lines out unless --verbosity is given
    (the progress bars and results say what matters)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input (a ValueError) exits with ``error: <first line>``, not a traceback from deep
    inside JAX; ``--verbosity=0`` also logs the traceback."""
    try:
        yield
    except ValueError as e:
        logging.info("error", exc_info=True)
        message = str(e).strip()
        sys.exit(f"error: {message.splitlines()[0] if message else repr(e)}")


def parse_flags(argv: Sequence[str]) -> Sequence[str]:
    """``app.run(main, flags_parser=cli.parse_flags)``: a bad flag value (or an unknown flag) is
    the same one-line ``error: ...`` as bad input, not absl's usage banner."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {str(e).strip().splitlines()[0]}")


def run_command(prog: str, define_flags: Callable[[flags.FlagValues, List[str]], None],
                run: Callable[[flags.FlagValues], int],
                argv: Optional[Sequence[str]] = None) -> int:
    """A command on absl flags of its own (``main(argv) -> exit code``, callable from tests):
    ``define_flags(fv, argv)`` defines them, ``run(fv)`` does the work. A bad flag, a stray
    argument or a ValueError from ``run`` is one line ``error: ...`` on stderr and exit code 1."""
    argv = [prog, *(sys.argv[1:] if argv is None else argv)]
    fv = flags.FlagValues()
    define_flags(fv, argv)
    if "--help" in argv or "-h" in argv:
        print(f"usage: python -m {prog} [flags]\n\n{fv.get_help()}")
        return 0
    try:
        extra = fv(argv)
        if len(extra) > 1:
            raise ValueError(f"unexpected arguments: {' '.join(extra[1:])}")
        return run(fv)
    except (flags.Error, ValueError) as e:
        logging.info("error", exc_info=True)
        message = str(e).strip()
        print(f"error: {message.splitlines()[0] if message else repr(e)}", file=sys.stderr)
        return 1
