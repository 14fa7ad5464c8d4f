"""Every notebook source (``notebooks/*.py``, jupytext percent scripts) runs top to bottom in small
mode (CNN_JAX_NOTEBOOK_SMOKE=1), and its paired ``.ipynb`` holds the same cells with the outputs
of a full run.

The notebooks run one after the other in one ``python3`` kernel (the venv's ipykernel) with the
working directory ``notebooks/``; ``shapes`` data goes to a temporary TFDS folder, and XLA
compiles at optimization level 0, which makes the small networks' compilation several times
faster.
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
            "03_train_and_checkpoint.py": (False, True), "04_ablation_results.py": (True, True),
            "05_filters_and_effective_receptive_fields.py": (True, True)}
NAMES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOKS, "[0-9]*.py")))


def _source(name):
    return jupytext.read(os.path.join(NOTEBOOKS, name))


def test_there_are_the_five_notebooks():
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


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every notebook source executed in small mode, one after the other in ONE kernel (a kernel
    start and the JAX/TensorFlow imports cost seconds each); returns {name: notebook or error}."""
    env = {"CNN_JAX_NOTEBOOK_SMOKE": "1", "TFDS_DATA_DIR": str(tmp_path_factory.mktemp("tfds")),
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS") or "--xla_backend_optimization_level=0",
           "MPLBACKEND": "Agg"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits them when it starts
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=NOTEBOOKS)
    done = {}
    try:
        for name in NAMES:
            nb = _source(name)  # the source of truth, without stored outputs
            client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT,
                                             resources={"metadata": {"path": NOTEBOOKS}})
            try:
                client.execute()  # raises CellExecutionError on the first failing cell
                done[name] = nb
            except Exception as e:  # noqa: BLE001 -- reported by that notebook's test
                done[name] = e
    finally:
        km.shutdown_kernel(now=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return done


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, executed):
    nb = executed[name]
    if isinstance(nb, Exception):
        raise nb
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "smoke mode: True" in text
    rich = [o for o in outputs if o.get("output_type") in ("execute_result", "display_data")]
    images = [o for o in rich if "image/png" in o.get("data", {})]
    tables = [o for o in rich if "text/markdown" in o.get("data", {})]
    results = os.path.join(REPO, "experiments", "results")
    has_results = any(os.path.exists(os.path.join(results, d, "runs.csv"))
                      for d in (os.listdir(results) if os.path.isdir(results) else ()))
    wants_tables, wants_images = EXPECTED[name]
    if name == "04_ablation_results.py" and not has_results:
        wants_tables = wants_images = False  # nothing to show before the experiments ran
    assert tables or not wants_tables, f"{name} showed no tables"
    assert images or not wants_images, f"{name} drew no figures"
