"""Regenerate the notebooks' outputs: ``python notebooks/execute.py [NAME ...]`` (default: all).

Each ``notebooks/NAME.py`` (the jupytext source) is paired to ``NAME.ipynb`` and executed top to
bottom in a fresh ``python3`` kernel with the working directory ``notebooks/``, writing the
outputs into the ``.ipynb`` (what ``jupytext --to ipynb`` and ``jupyter execute --inplace`` do).
"""

from __future__ import annotations

import glob
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def execute(name: str, timeout: int = 1800) -> str:
    import jupytext
    import nbclient
    import nbformat

    source = os.path.join(HERE, name if name.endswith(".py") else name + ".py")
    if not os.path.exists(source):
        raise SystemExit(f"error: no notebook source {source}")
    nb = jupytext.read(source)
    start = time.time()
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": HERE}}).execute()
    target = source[:-3] + ".ipynb"
    nbformat.write(nb, target)
    print(f"executed {os.path.relpath(target)} in {time.time() - start:.0f} s", flush=True)
    return target


def main(argv) -> int:
    names = argv or sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "0*.py")))
    os.environ.pop("CNN_JAX_NOTEBOOK_SMOKE", None)  # the committed outputs are full runs'
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in names:
        execute(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
