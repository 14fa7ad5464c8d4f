"""Data parallelism on 8 fake CPU devices: pmap == shard_map == one device, BN sync, eval sums.

JAX fixes its device count at start-up and this pytest process has one device, so the checks run
in a subprocess (tests/_train_multidevice.py, a chex/absltest suite) and each of its test cases
is reported here as its own pytest test.
"""

import os
import xml.etree.ElementTree as ET

import pytest

import _train_helpers as h

SUITE = os.path.join(h.REPO, "tests", "_train_multidevice.py")
EXPECTED = [
    "test_step_variants__with_jit",
    "test_step_variants__with_pmap",
    "test_devices",
    "test_pmap_8_devices_equals_1_device",
    "test_shard_map_equals_pmap0 (False, 0.3)",
    "test_shard_map_equals_pmap1 (True, 0.0)",
    "test_batch_stats_synced0 ('pmap')",
    "test_batch_stats_synced1 ('shard_map')",
    "test_eval_sums_over_devices0 ('pmap')",
    "test_eval_sums_over_devices1 ('shard_map')",
    "test_batch_not_divisible",
]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    xml = tmp_path_factory.mktemp("multidevice") / "results.xml"
    proc = h.run_python([SUITE, f"--xml_output_file={xml}"], timeout=900)
    results = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            problems = [c for c in case if c.tag in ("failure", "error")]
            results[case.get("name")] = (
                "\n".join((p.get("message") or "") + "\n" + (p.text or "") for p in problems)
                if problems else None)
    return proc, results


@pytest.mark.parametrize("name", EXPECTED)
def test_multidevice(suite, name):
    proc, results = suite
    assert name in results, (
        f"{name} did not run (exit code {proc.returncode}); ran: {sorted(results)}\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    assert results[name] is None, results[name]


def test_suite_exit_code(suite):
    proc, results = suite
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert len(results) == len(EXPECTED), sorted(results)
