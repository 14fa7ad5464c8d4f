"""Data parallelism: one per-device step, run under ``jax.pmap`` or ``jax.shard_map``.

Both back ends see the same host-side layout: every array carries a leading device axis (the
state replicated once per device, the batch split ``[devices, per_device, ...]``), so the train
loop does not care which one runs. ``pmap`` maps over the local devices and its collectives span
all processes; ``shard_map`` maps over a 1-D mesh of all (global) devices.

With one device in all (a laptop, this project's CPU runs) there is nothing to map, and the
device axis costs time: a program whose donated state arrives as ``[1, ...]`` and leaves as
``[1, ...]`` made XLA:CPU recompute the optimizer's new moments inside the parameter update and
copy every old moment and parameter first (the default run's resnet18 with AdamW: 128 MiB of
copies per train step, against 16 MiB without the axis). So there :class:`DataParallel` keeps
arrays without the device axis (``replicate``, ``shard`` and ``unreplicate`` drop and restore
it on the host, where that is free) and compiles the same per-device step with ``jax.jit``, its
collectives over a one-device mesh. Train steps on the 2-core AVX-512 host, in one process,
rounds alternating, both build orders: the default run's resnet18 139 / 130 -> 119 / 115 ms,
alexnet at batch 16 512 / 531 -> 446 / 477 ms.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODES = ("pmap", "shard_map")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """``jax.distributed.initialize`` from arguments or the environment; False if single-process.

    Unset arguments fall back to ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; when only some are known JAX's cluster detection (SLURM, Open MPI, ...)
    fills in the rest. Must run before anything touches a JAX device.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address is None and num_processes is None and process_id is None:
        return False
    if num_processes == 1 and coordinator_address is None:
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def check_batch_size(global_batch_size: int, num_devices: Optional[int] = None) -> int:
    """The per-device batch; a one-line ValueError when the batch does not split evenly."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by the {num_devices} devices; "
            f"pass --config.batch_size=<a multiple of {num_devices}>")
    return global_batch_size // num_devices


def _first_shard(x: Any) -> np.ndarray:
    """This process's copy of device 0's entry of an array with a leading device axis."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)[0]
    shard = x.addressable_data(0)
    return np.asarray(shard[0] if shard.ndim == x.ndim else shard)


class DataParallel:
    """Runs per-device functions over the devices with a named axis (``pmap`` or ``shard_map``)."""

    def __init__(self, mode: str = "pmap", axis_name: str = "batch",
                 devices: Optional[Sequence[jax.Device]] = None):
        if mode not in MODES:
            raise ValueError(f"unknown parallel mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.axis_name = axis_name
        self._all_devices = devices is None
        if devices is None:
            devices = jax.local_devices() if mode == "pmap" else jax.devices()
        self.devices = list(devices)
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        self.mesh = Mesh(np.array(self.devices), (axis_name,))
        self.sharding = NamedSharding(self.mesh, P(axis_name))
        # One device in all: arrays on the device carry no device axis (module docstring).
        self.single = len(self.devices) == 1 and jax.process_count() == 1

    @property
    def num_local_devices(self) -> int:
        return len(self.local_devices)

    @property
    def num_devices(self) -> int:
        """Devices taking part in the collectives (all processes)."""
        if self.mode == "pmap" and self._all_devices:
            return jax.device_count()
        return len(self.devices)

    def map(self, fn: Callable[..., Any], donate_argnums: Sequence[int] = ()) -> Callable:
        """Compile per-device ``fn`` (which may use collectives over ``axis_name``) over devices.

        Every argument and output carries the leading device axis, except with one device in all
        (:attr:`single`), where none does; :meth:`shard`, :meth:`replicate` and
        :meth:`unreplicate` take and give the same host layout either way.
        """
        donate_argnums = tuple(donate_argnums)
        if self.single:
            # The collectives run over a mesh of one device; nothing is split or stacked.
            mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=P(), out_specs=P(),
                                   check_vma=False)
            return jax.jit(mapped, donate_argnums=donate_argnums)
        if self.mode == "pmap":
            return jax.pmap(fn, axis_name=self.axis_name, donate_argnums=donate_argnums,
                            devices=None if self._all_devices else self.devices)

        def per_shard(*args):
            # Each instance sees a [1, ...] block of every argument: drop and restore that axis.
            out = fn(*jax.tree_util.tree_map(lambda x: x[0], args))
            return jax.tree_util.tree_map(lambda x: x[None], out)

        mapped = jax.shard_map(per_shard, mesh=self.mesh, in_specs=P(self.axis_name),
                               out_specs=P(self.axis_name))
        return jax.jit(mapped, donate_argnums=donate_argnums)

    def shard(self, tree: Any) -> Any:
        """Place host arrays of shape ``[local_devices, ...]`` on the devices (one row each)."""
        def put(x):
            x = np.asarray(x)
            if x.shape[:1] != (self.num_local_devices,):
                raise ValueError(f"expected a leading axis of {self.num_local_devices} local "
                                 f"devices, got shape {x.shape}")
            if self.single:
                return jax.device_put(x[0], self.devices[0])
            return jax.make_array_from_process_local_data(self.sharding, x)
        return jax.tree_util.tree_map(put, tree)

    def replicate(self, tree: Any) -> Any:
        """One copy of ``tree`` per device (host copies, then placed with :meth:`shard`)."""
        if self.single:
            return jax.device_put(jax.tree_util.tree_map(np.asarray, tree), self.devices[0])
        n = self.num_local_devices
        return self.shard(jax.tree_util.tree_map(
            lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree))

    def unreplicate(self, tree: Any) -> Any:
        """Device 0's copy of a replicated tree, as host numpy arrays (safe to keep: copies)."""
        if self.single:
            return jax.tree_util.tree_map(np.array, tree)
        return jax.tree_util.tree_map(lambda x: np.array(_first_shard(x)), tree)

    def prefetch(self, iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
        """Place batches on the devices ``size`` steps ahead of their use."""
        queue: collections.deque = collections.deque()
        iterator = iter(iterator)

        def enqueue(n):
            for _ in range(n):
                try:
                    queue.append(self.shard(next(iterator)))
                except StopIteration:
                    return

        enqueue(max(size, 1))
        while queue:
            yield queue.popleft()
            enqueue(1)
