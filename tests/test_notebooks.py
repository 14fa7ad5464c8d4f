"""Every notebook runs top to bottom (small sizes: CNN_JAX_NOTEBOOK_SMOKE=1) and matches _build.py.

The notebooks run in a fresh ``python3`` kernel (the venv's ipykernel) with the working directory
``notebooks/``; ``shapes`` data goes to a temporary TFDS folder, and XLA compiles at optimization
level 0, which makes the small networks' compilation several times faster.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (the dev extra)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (the dev extra)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
CELL_TIMEOUT = 300
# notebook -> (shows markdown tables, draws figures)
EXPECTED = {"01_model_zoo.ipynb": (True, False), "02_receptive_fields.ipynb": (True, True),
            "03_train_and_checkpoint.ipynb": (False, True),
            "04_ablation_results.ipynb": (True, True)}


def _builder():
    spec = importlib.util.spec_from_file_location("notebooks_build",
                                                  os.path.join(NOTEBOOKS, "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _builder()
NAMES = sorted(BUILD.NOTEBOOKS)


def test_there_are_the_four_notebooks():
    assert NAMES == ["01_model_zoo.ipynb", "02_receptive_fields.ipynb",
                     "03_train_and_checkpoint.ipynb", "04_ablation_results.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_build_script(name):
    """The .ipynb cells are exactly _build.py's (rebuild with `python notebooks/_build.py`)."""
    committed = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(committed)
    built = BUILD.build(BUILD.NOTEBOOKS[name])
    assert [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in built.cells]
    assert committed.metadata.kernelspec.name == "python3"
    for cell in committed.cells:  # stored outputs, if any, come from a clean run
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", (name, cell.source[:80])


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = BUILD.build(BUILD.NOTEBOOKS[name])  # the source of truth, without stored outputs
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
    if name == "04_ablation_results.ipynb" and not has_results:
        wants_tables = wants_images = False  # nothing to show before the experiments ran
    assert tables or not wants_tables, f"{name} showed no tables"
    assert images or not wants_images, f"{name} drew no figures"
