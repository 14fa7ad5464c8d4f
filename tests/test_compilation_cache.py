"""What the commands set for their whole process: the persistent compilation cache (a program
compiled once is read back, not compiled again) and the garbage collector's thresholds."""

import gc
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cnn_jax import cli

_PROBE = """
import sys, jax, jax.numpy as jnp
from jax import monitoring
from cnn_jax import cli
hits = []
monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
cli.enable_compilation_cache(sys.argv[1], min_compile_seconds=0)
jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((8, 8))).block_until_ready()
print("HITS", len(hits))
"""


def _probe(directory):
    out = subprocess.run([sys.executable, "-c", _PROBE, str(directory)], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return int(out.split("HITS")[-1])


def test_second_process_reads_the_program_back(tmp_path):
    cache = tmp_path / "xla"
    assert _probe(cache) == 0  # cold: every program compiled and written
    assert any(cache.iterdir())
    assert _probe(cache) == 3  # warm: all three programs (ones, sin-matmul, +1) read back


def test_cache_dir_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ValueError, match="is a file; pass a directory"):
        cli.enable_compilation_cache(str(path))


def test_test_session_uses_the_cache():
    # conftest.py turns it on for every test process and the subprocesses they start.
    assert jax.config.jax_compilation_cache_dir
    assert jax.jit(lambda x: x + 1)(jnp.ones(2)).sum() == 4


def test_commands_and_the_test_session_tune_the_garbage_collector():
    assert gc.get_threshold() == cli.GC_THRESHOLDS  # conftest.py
    default = (700, 10, 10)
    try:
        gc.set_threshold(*default)
        assert cli.run_command("probe", lambda fv, argv: None, lambda fv: 0, []) == 0
        assert gc.get_threshold() == cli.GC_THRESHOLDS
    finally:
        gc.set_threshold(*cli.GC_THRESHOLDS)
