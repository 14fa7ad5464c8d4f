"""Test-session set-up: one persistent XLA compilation cache for every test process.

pytest-xdist's workers and the command-line tools the tests start in subprocesses compile many
of the same programs (the same small models' init, train and eval steps); with the cache each is
compiled once per checkout. It lives in .pytest_cache/ (git-ignored), so a fresh clone starts
cold; set JAX_COMPILATION_CACHE_DIR to put it elsewhere, or CNN_JAX_TEST_COMPILATION_CACHE=0 to
compile everything anew.
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("CNN_JAX_TEST_COMPILATION_CACHE", "1") != "0":
    # Set before JAX is imported: JAX reads its config from the environment, and subprocesses
    # (python -m cnn_jax.train ...) inherit it through cnn_jax.cli's --compilation_cache_dir.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(_ROOT, ".pytest_cache", "jax_compilation_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
else:
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
