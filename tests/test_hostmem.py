"""cnn_jax.hostmem: XLA:CPU's step buffers reused instead of mapped and faulted in every step."""

from __future__ import annotations

import json
import sys

import pytest

import _train_helpers as h

# A jitted step whose 128 MiB intermediate (a [4M, 8] product, read twice) is a temporary buffer of
# the execution: allocated and freed at every call, above glibc's largest mmap threshold.
_SCRIPT = r"""
import json, resource, sys
from cnn_jax import hostmem
applied = hostmem.keep_freed_memory()
import jax, jax.numpy as jnp
from jax._src import xla_bridge
x = jnp.ones((1 << 22, 8), jnp.float32)
w = jnp.eye(8, dtype=jnp.float32)
step = jax.jit(lambda x, w: (lambda a: (a * a).sum(0) + a.max(0))(x @ w))
for _ in range(3):
    step(x, w).block_until_ready()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "again": hostmem.keep_freed_memory(), "faults": faults,
                  "async": xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_step_buffers_are_reused_not_faulted_in_every_call():
    runs = {}
    for keep in ("1", "0"):
        proc = h.run_python(["-c", _SCRIPT], CNN_JAX_KEEP_FREED_MEMORY=keep)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[keep] = json.loads(h.last_line(proc.stdout))
    kept, default = runs["1"], runs["0"]
    assert kept["applied"] and kept["again"] and not kept["async"]
    assert not default["applied"] and default["async"]
    pages = (128 << 20) // 4096  # the temporary buffer, in 4 KiB pages
    # The heap can grow once more while a call's buffers are still held when the next one
    # allocates (they are freed asynchronously); after that the calls reuse what it holds.
    assert sorted(kept["faults"])[2] < pages // 10, kept
    assert min(default["faults"]) > pages // 2, default  # mapped afresh and faulted in each call


def test_keep_freed_memory_after_the_backend_started_changes_nothing():
    script = ("import jax; jax.devices(); from cnn_jax import hostmem; "
              "from jax._src import xla_bridge; "
              "print(hostmem.keep_freed_memory(), xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)")
    proc = h.run_python(["-c", script], CNN_JAX_KEEP_FREED_MEMORY="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert h.last_line(proc.stdout) == "False True"
