"""What the command-line tools share: absl set-up and one-line errors for bad input."""

import contextlib
import sys
from typing import Iterator, Sequence

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
