"""What the notebooks (``notebooks/*.py``, jupytext percent scripts) share: set-up, tables, shapes.

Every notebook calls :func:`setup` first; ``CNN_JAX_NOTEBOOK_SMOKE=1`` (how the tests run them)
makes it return True, and the notebook then uses tiny sizes with the same cells.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

SMOKE_ENV = "CNN_JAX_NOTEBOOK_SMOKE"


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def setup() -> bool:
    """Quiet TensorFlow, show matplotlib ``Figure`` objects as PNG (the notebooks draw without
    pyplot, so no global state), print the versions; returns whether smoke mode is on."""
    from cnn_jax import cli

    cli.quiet_tensorflow_env("2")
    cli.import_tensorflow_quietly()
    import jax
    from matplotlib.figure import Figure

    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None:
        shell.display_formatter.formatters["image/png"].for_type(Figure, _figure_png)
    smoke = os.environ.get(SMOKE_ENV) == "1"
    print(f"JAX {jax.__version__} on {jax.default_backend()}; smoke mode: {smoke}")
    return smoke


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]):
    """Rows as a markdown table for display (no pandas needed)."""
    from IPython.display import Markdown

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


def repo_root(start: str = ".") -> str:
    """The repository root: the first parent folder of ``start`` that holds ``experiments/``."""
    path = os.path.abspath(start)
    while not os.path.isdir(os.path.join(path, "experiments")):
        parent = os.path.dirname(path)
        if parent == path:
            raise FileNotFoundError("run this notebook inside the cnn_jax repository")
        path = parent
    return path
