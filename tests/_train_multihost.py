"""One process of the multi-host test (tests/test_multihost.py); also runs single-process.

Each process takes its rows of the same global batches, trains the tiny BN network for a few
steps with pmap and with shard_map, evaluates a masked batch, saves and restores an Orbax
checkpoint in a shared directory, and prints a JSON line with what it saw. The distributed
setup comes from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID),
as `python -m cnn_jax.train` reads it.
"""

import functools
import json
import sys

import jax
import numpy as np
import optax

import _train_helpers as h
from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import parallel
from cnn_jax import train_step as ts

GLOBAL_BATCH = 16
STEPS = 3


def local_rows(batch, process_index, process_count, num_local_devices):
    """This process's contiguous rows of a global batch, shaped [local devices, per device]."""
    n = GLOBAL_BATCH // process_count
    local = {k: v[process_index * n:(process_index + 1) * n] for k, v in batch.items()}
    return h.split_devices(local, num_local_devices)


def run(mode, workdir):
    model = h.tiny_module()
    tx = optax.sgd(0.1, momentum=0.9)
    state = ts.create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 3))
    host = jax.tree_util.tree_map(np.asarray, state)
    dp = parallel.DataParallel(mode)
    step = dp.map(functools.partial(ts.train_step, axis_name="batch"), donate_argnums=(0,))
    sync = dp.map(functools.partial(ts.sync_batch_stats, axis_name="batch"), donate_argnums=(0,))
    evaluate = dp.map(functools.partial(ts.eval_step, axis_name="batch"))
    pi, pc = jax.process_index(), jax.process_count()
    rstate = dp.replicate(host)
    losses = []
    for batch in h.fake_batches(STEPS, GLOBAL_BATCH):
        rstate, metrics = step(rstate, dp.shard(local_rows(batch, pi, pc, dp.num_local_devices)))
        losses.append(float(dp.unreplicate(metrics)["loss"]))
    rstate = sync(rstate)
    eval_batch = h.fake_batches(1, GLOBAL_BATCH, seed=5)[0]
    eval_batch["mask"] = np.arange(GLOBAL_BATCH) < 13
    sums = dp.unreplicate(evaluate(rstate, dp.shard(
        local_rows(eval_batch, pi, pc, dp.num_local_devices))))
    final = dp.unreplicate(rstate)

    checkpointer = ckpt_lib.Checkpointer(workdir)
    checkpointer.save(STEPS, final, {"arch": "tiny", "mode": mode}, metrics={"top1": 0.5})
    checkpointer.wait_until_finished()
    restored, meta, step_restored = checkpointer.restore(host)
    checkpointer.close()
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(restored),
                                                     jax.tree_util.tree_leaves(final)))
    return {"losses": losses,
            "params_l1": float(sum(np.abs(x).sum() for x in jax.tree_util.tree_leaves(final.params))),
            "bn_mean": np.asarray(final.batch_stats["bn"]["mean"]).tolist(),
            "eval": {k: float(v) for k, v in sums.items()},
            "restored_step": step_restored, "restored_equal": bool(same), "meta": meta}


def main():
    workdir = sys.argv[1]
    distributed = parallel.initialize_distributed()
    out = {"distributed": distributed, "process_index": jax.process_index(),
           "process_count": jax.process_count(), "local_devices": jax.local_device_count(),
           "devices": jax.device_count()}
    for mode in parallel.MODES:
        out[mode] = run(mode, f"{workdir}/{mode}")
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
