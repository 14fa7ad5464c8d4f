"""What the command-line tools share: absl set-up and one-line errors for bad input."""

import contextlib
import gc
import importlib.util
import logging as py_logging
import os
import sys
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import app, flags, logging

from cnn_jax import hostmem

# TFDS warnings that say nothing to act on: generated `shapes` variants have no registered config
# and no dataset_info.json until prepared.
_TFDS_NOISE = ("Using custom data configuration", "has no dataset_info.json")


class _NoiseFilter(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in _TFDS_NOISE)


def quiet_tensorflow(argv: Sequence[str]) -> None:
    """Hide TensorFlow's C++ INFO and WARNING lines (oneDNN notices...) unless --verbosity is
    given; call before TensorFlow is imported."""
    if not any(a.startswith(("--verbosity", "-v")) for a in argv[1:]):
        quiet_tensorflow_env("2")
        import_tensorflow_quietly()


def quiet_tensorflow_env(min_log_level: str = "2") -> None:
    """Keep TensorFlow's C++ INFO (and WARNING) lines off the screen; call before TensorFlow is
    imported. A value already in the environment wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", min_log_level)


# What TensorFlow writes to the process's stderr on import whatever TF_CPP_MIN_LOG_LEVEL says:
# tensorflow-cpu 2.21 as installed from PyPI on 2026-12-05 logs its oneDNN notice through absl's
# C++ logging before absl is set up, twice. Turning oneDNN off (TF_ENABLE_ONEDNN_OPTS=0) would
# silence it but slows the input pipeline by ~12% (`python -m cnn_jax.benchmark_input`, AVX-512
# host: 739, 671, 509, 731 against 784, 808, 756, 814 images/s, alternating).
_TF_IMPORT_NOISE = ("oneDNN custom operations are on",
                    "All log messages before absl::InitializeLog() is called")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (where it is installed and not yet imported) with the lines of
    ``_TF_IMPORT_NOISE`` taken out of what it writes to stderr; the rest is written back."""
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
                    if not any(n in line for n in _TF_IMPORT_NOISE)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


DEFAULT_COMPILATION_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cnn_jax", "xla")

flags.DEFINE_bool("compilation_cache", True, "Keep compiled XLA programs on disk, so that a "
                  "repeated or resumed run does not compile them again.")
flags.DEFINE_string("compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_COMPILATION_CACHE_DIR,
                    "Where --compilation_cache keeps them ($JAX_COMPILATION_CACHE_DIR).")


def enable_compilation_cache(directory: str = DEFAULT_COMPILATION_CACHE_DIR,
                             min_compile_seconds: float = 0.5) -> None:
    """JAX's persistent compilation cache in ``directory``, for programs that took at least
    ``min_compile_seconds`` to compile (smaller ones cost more to look up than to rebuild)."""
    import jax

    if os.path.isfile(directory):
        raise ValueError(f"--compilation_cache_dir {directory} is a file; pass a directory "
                         "(or --nocompilation_cache)")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)


# CPython collects its youngest generation of objects every 700 net allocations, and the older
# ones after 10 of those: tracing a model (Flax modules, jaxpr equations, tracers) allocates
# millions of objects that live until the trace ends, so the collector scans a growing heap over
# and over. Tracing googlenet's and densenet121's train steps in a fresh process spent 2.05 of
# 11.8 s of CPU in it, 0.36 s with these thresholds; the test files test_forward_jit.py and
# test_models.py in one process 10.0 s of ~130 (1.5 s). Cycles are still collected, later.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """The cyclic garbage collector at ``GC_THRESHOLDS`` (for a whole process: the commands and
    the test session call it; importing cnn_jax does not)."""
    gc.set_threshold(*GC_THRESHOLDS)


def setup(argv: Sequence[str]) -> None:
    """Reject stray positional arguments; keep absl's INFO lines and TFDS's notices out unless
    --verbosity is given (the progress bars and results say what matters); turn on the
    compilation cache; tune the garbage collector for tracing (``tune_gc``); reuse XLA:CPU's
    step buffers instead of faulting them in every step (``hostmem.keep_freed_memory``)."""
    tune_gc()
    hostmem.keep_freed_memory()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        py_logging.getLogger("absl").addFilter(_NoiseFilter())
    if flags.FLAGS.compilation_cache:
        with one_line_errors():
            enable_compilation_cache(flags.FLAGS.compilation_cache_dir)


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


MODEL_FLAG = "--model."


def split_model_options(argv: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """``--model.FIELD=VALUE`` arguments out of ``argv``: the model options of a command without a
    config (the benchmarks), spelled like ``python -m cnn_jax.train``'s ``--config.model.FIELD``.
    Returns the other arguments and ``{FIELD: VALUE}`` (strings; the registry types and checks
    them against the model's fields)."""
    rest, options = [], {}
    for arg in argv:
        if not arg.startswith(MODEL_FLAG):
            rest.append(arg)
            continue
        field, sep, value = arg[len(MODEL_FLAG):].partition("=")
        if not sep or not field:
            sys.exit(f"error: write model options as {MODEL_FLAG}FIELD=VALUE, not {arg!r}")
        options[field] = value
    return rest, options


def run_command(prog: str, define_flags: Callable[[flags.FlagValues, List[str]], None],
                run: Callable[..., int], argv: Optional[Sequence[str]] = None, *,
                positional: Optional[str] = None, description: str = "") -> int:
    """A command on absl flags of its own (``main(argv) -> exit code``, callable from tests):
    ``define_flags(fv, argv)`` defines them, ``run(fv)`` does the work; with ``positional`` (its
    usage text, e.g. ``"NAME [NAME ...]"``) the command takes arguments, ``run(fv, args)``. A bad
    flag, a stray argument or a ValueError from ``run`` is one line ``error: ...`` on stderr and
    exit code 1; ``--help`` prints the usage, ``description`` and the flags."""
    argv = [prog, *(sys.argv[1:] if argv is None else argv)]
    tune_gc()
    fv = flags.FlagValues()
    define_flags(fv, argv)
    if "--help" in argv or "-h" in argv:
        usage = f"{positional} [flags]" if positional else "[flags]"
        text = f"{description.strip()}\n\n" if description else ""
        print(f"usage: python -m {prog} {usage}\n\n{text}{fv.get_help()}")
        return 0
    try:
        extra = fv(argv)[1:]
        if positional:
            return run(fv, extra)
        if extra:
            raise ValueError(f"unexpected arguments: {' '.join(extra)}")
        return run(fv)
    except (flags.Error, ValueError) as e:
        logging.info("error", exc_info=True)
        message = str(e).strip()
        print(f"error: {message.splitlines()[0] if message else repr(e)}", file=sys.stderr)
        return 1
