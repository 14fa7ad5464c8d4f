"""Host memory that stays with the process, so that XLA:CPU reuses a step's buffers.

XLA:CPU allocates the temporary buffer of each execution (a train step's saved activations:
2.3 GB for resnet50 at batch 16 and 224 px) with ``posix_memalign``. glibc serves requests that
large with ``mmap`` and frees them with ``munmap``, so every step maps its buffers afresh and the
kernel zeroes and faults every page in: resnet50 ~620,000 minor page faults (2.4 GiB) and ~0.9 s
of system CPU time per train step, alexnet ~100,000 (0.4 GiB), resnet18 at 32 px and batch 64
~28,000. :func:`keep_freed_memory` stops that:

- glibc's ``mallopt``: ``M_MMAP_MAX`` 0 (large requests come from the heap, not ``mmap``) and
  ``M_TRIM_THRESHOLD`` -1 (freed memory is never handed back), so a step's buffers are the
  previous step's memory: 0 faults per step;
- ``jax_cpu_enable_async_dispatch`` off: XLA:CPU then allocates on the calling thread, whose heap
  (glibc's main arena) those settings govern. Asynchronously it allocates on worker threads,
  whose arenas serve requests above 64 MiB by ``mmap`` whatever ``M_MMAP_MAX`` says; limiting
  glibc to one arena (``M_ARENA_MAX`` 1) instead made small networks' steps 15-35% slower (their
  threads then share one lock). The flag applies to single-device computations only; pmap over
  several CPU devices stays asynchronous.

Measured on the 2-core AVX-512 host (2026-12-05, separate processes alternating): resnet50 at
batch 16 2,915 / 2,897 -> 2,338 / 2,519 ms per train step (system CPU 0.9 s -> 4-8 ms per
step), alexnet 553-604 -> 478 ms; the experiments' resnet20 (no faults either way) unchanged.

The command-line tools call it in ``cli.setup``, and each worker process of ``experiments.run``
first thing (a spawned interpreter: the runner's settings do not carry over; until 2026-12-06 they
did not, and DenseNet-BC-34's 94 MB step faulted in 23,000 pages, 35 of its 135 ms), before JAX
starts its CPU backend (the dispatch flag is read when the backend starts; the ``mallopt``
settings act from the moment they are set).
A notebook can call it first thing. The cost: the process keeps the memory of its largest step
until it exits, as it holds it during the step anyway. ``CNN_JAX_KEEP_FREED_MEMORY=0`` leaves
glibc and JAX as they are.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

ENV = "CNN_JAX_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h): never trim the heap (-1), never mmap.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
_applied: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Make the process reuse XLA:CPU's step buffers (see the module docstring); once per
    process, before JAX's backends start. Returns whether it took effect: False off Linux, with
    a C library without ``mallopt`` (musl), with ``CNN_JAX_KEEP_FREED_MEMORY=0``, or once a
    backend has started (its dispatch mode is fixed then, and ``mallopt`` alone would not reach
    the worker threads' allocations)."""
    global _applied
    if _applied is None:
        import jax
        from jax._src import xla_bridge

        started = getattr(xla_bridge, "backends_are_initialized", lambda: False)()
        _applied = not started and _apply_mallopt()
        if _applied:
            jax.config.update("jax_cpu_enable_async_dispatch", False)
    return _applied


def _apply_mallopt() -> bool:
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in _SETTINGS])
