"""Every notebook source (``notebooks/*.py``, jupytext percent scripts) runs top to bottom in small
mode (CNN_JAX_NOTEBOOK_SMOKE=1), and its paired ``.ipynb`` holds the same cells with the outputs
of a full run.

The notebooks run in a fresh ``python3`` kernel (the venv's ipykernel) with the working directory
``notebooks/``; ``shapes`` data goes to a temporary TFDS folder, and XLA compiles at optimization
level 0, which makes the small networks' compilation several times faster.
"""

from __future__ import annotations

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (the dev extra)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (the dev extra)")
jupytext = pytest.importorskip("jupytext", reason="notebook tests need jupytext (the dev extra)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
CELL_TIMEOUT = 300
# notebook -> (shows markdown tables, draws figures)
EXPECTED = {"01_model_zoo.py": (True, False), "02_receptive_fields.py": (True, True),
            "03_train_and_checkpoint.py": (False, True), "04_ablation_results.py": (True, True)}
NAMES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOKS, "*.py")))


def _source(name):
    return jupytext.read(os.path.join(NOTEBOOKS, name))


def test_there_are_the_four_notebooks():
    assert NAMES == sorted(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_paired_notebook_has_the_cells_and_outputs_of_a_run(name):
    """The .ipynb holds the source's cells (``jupytext --sync notebooks/*.py`` pairs them) and the
    outputs of a clean top-to-bottom run: every code cell ran, in order, without an error."""
    committed = nbformat.read(os.path.join(NOTEBOOKS, name[:-3] + ".ipynb"), as_version=4)
    nbformat.validate(committed)
    source = _source(name)
    assert [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in source.cells]
    assert committed.metadata.kernelspec.name == "python3"
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "smoke mode: False" in text  # the committed outputs are a full run's


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = _source(name)  # the source of truth, without stored outputs
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "smoke mode: True" in text
    rich = [o for o in outputs if o.get("output_type") in ("execute_result", "display_data")]
    images = [o for o in rich if "image/png" in o.get("data", {})]
    tables = [o for o in rich if "text/markdown" in o.get("data", {})]
    results = os.path.join(REPO, "experiments", "results")
    has_results = any(os.path.exists(os.path.join(results, d, "summary.csv"))
                      for d in (os.listdir(results) if os.path.isdir(results) else ()))
    wants_tables, wants_images = EXPECTED[name]
    if name == "04_ablation_results.py" and not has_results:
        wants_tables = wants_images = False  # nothing to show before the experiments ran
    assert tables or not wants_tables, f"{name} showed no tables"
    assert images or not wants_images, f"{name} drew no figures"
