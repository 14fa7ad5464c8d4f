"""Two processes on localhost (jax.distributed + CPU collectives) match one process.

Two processes with 2 CPU devices each and one process with 4 devices train the tiny BN network on
the same global batches (each process feeding its own rows), with pmap and with shard_map: the
losses, the final model, the evaluation sums and the Orbax checkpoint round trip must agree.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import _train_helpers as h

WORKER = os.path.join(h.REPO, "tests", "_train_multihost.py")
MODES = ("pmap", "shard_map")


def _result(proc_out: str) -> dict:
    lines = [line for line in proc_out.splitlines() if line.startswith("RESULT ")]
    assert lines, proc_out[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    port = h.free_port()
    procs = []
    for pid in range(2):
        env = h.python_env(num_cpu_devices=2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                           JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, WORKER, str(tmp / "multi")], cwd=h.REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    single = subprocess.Popen([sys.executable, WORKER, str(tmp / "single")], cwd=h.REPO,
                              env=h.python_env(num_cpu_devices=4), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    outs = []
    try:
        for p in procs + [single]:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-5000:]
            outs.append(_result(out))
    finally:
        for p in procs + [single]:
            if p.poll() is None:
                p.kill()
    return outs[:2], outs[2]


def test_two_processes_initialized(runs):
    multi, single = runs
    assert [r["process_index"] for r in multi] == [0, 1]
    for r in multi:
        assert r["distributed"] and r["process_count"] == 2
        assert r["local_devices"] == 2 and r["devices"] == 4
    assert not single["distributed"] and single["devices"] == 4


@pytest.mark.parametrize("mode", MODES)
def test_losses_match_single_process(runs, mode):
    multi, single = runs
    for r in multi:
        np.testing.assert_allclose(r[mode]["losses"], single[mode]["losses"], rtol=1e-5)
        np.testing.assert_allclose(r[mode]["params_l1"], single[mode]["params_l1"], rtol=1e-5)
        np.testing.assert_allclose(r[mode]["bn_mean"], single[mode]["bn_mean"], rtol=1e-4,
                                   atol=1e-7)
    assert multi[0][mode]["losses"] == multi[1][mode]["losses"]  # pmean: identical everywhere


@pytest.mark.parametrize("mode", MODES)
def test_eval_sums_over_processes(runs, mode):
    multi, single = runs
    for r in multi:
        assert r[mode]["eval"]["count"] == 13.0  # masked rows of both processes, counted once
        for k in ("loss", "top1", "top5"):
            np.testing.assert_allclose(r[mode]["eval"][k], single[mode]["eval"][k], rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_round_trip_multiprocess(runs, mode):
    multi, _ = runs
    for r in multi:
        assert r[mode]["restored_step"] == 3
        assert r[mode]["restored_equal"]
        assert r[mode]["meta"] == {"arch": "tiny", "mode": mode}
