"""Shared pieces of the training tests: a tiny BN network, fake batches, subprocess helpers.

Imported by the pytest files and by the multi-device/multi-process worker scripts (which must set
XLA_FLAGS before JAX starts, so this module imports JAX lazily).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any, Dict, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A registered model shrunk to a few thousand parameters, for end-to-end runs.
TINY_ARCH = "resnet20"
TINY_MODEL = {"stage_sizes": (1, 1, 1), "widths": (4, 8, 8)}  # config.model
TINY_MODEL_FLAGS = ["--config.model.stage_sizes=(1, 1, 1)", "--config.model.widths=(4, 8, 8)"]
TINY_MODEL_OPTIONS = ["--model.stage_sizes=1,1,1", "--model.widths=4,8,8"]  # cnn_jax.benchmark
# A small `shapes` variant: 32 px, 256 train / 64 validation images (generated in ~1 s).
TINY_DATASET = "shapes/32px_n256_v64"


def tiny_module(dropout: float = 0.0, aux: bool = False, num_classes: int = 10):
    """conv -> BN -> relu -> mean -> [dropout] -> dense; with ``aux`` it returns a tuple in train."""
    import flax.linen as nn
    import jax.numpy as jnp

    class Tiny(nn.Module):
        num_classes: int = 10
        dtype: Any = jnp.float32
        dropout_rate: float = 0.0
        with_aux: bool = False

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(8, (3, 3), dtype=self.dtype, name="conv")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                             name="bn")(x)
            x = nn.relu(x).mean(axis=(1, 2))
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name="drop")(x)
            logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
            if self.with_aux and train:
                return logits, nn.Dense(self.num_classes, dtype=self.dtype, name="aux")(x)
            return logits

    return Tiny(num_classes=num_classes, dropout_rate=dropout, with_aux=aux)


def fake_batches(num: int, batch_size: int, image_size: int = 8, num_classes: int = 10,
                 seed: int = 0) -> list:
    rng = np.random.RandomState(seed)
    return [{"image": rng.randn(batch_size, image_size, image_size, 3).astype(np.float32),
             "label": rng.randint(0, num_classes, batch_size).astype(np.int32)}
            for _ in range(num)]


def split_devices(batch: Dict[str, np.ndarray], num_devices: int) -> Dict[str, np.ndarray]:
    """[B, ...] -> [D, B / D, ...]."""
    return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_env(num_cpu_devices: Optional[int] = None, **extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    # Keep the session's flags (conftest.py: -O0) but not a device count set by someone else.
    kept = [f for f in env.pop("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    if num_cpu_devices:
        kept.append(f"--xla_force_host_platform_device_count={num_cpu_devices}")
    if kept:
        env["XLA_FLAGS"] = " ".join(kept)
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def run_python(args: Sequence[str], timeout: float = 300, **env_kwargs) -> subprocess.CompletedProcess:
    """Run ``python <args>`` in the repository root; returns the completed process."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=python_env(**env_kwargs),
                          capture_output=True, text=True, timeout=timeout)


_BLOCKER = '''
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked: the GPU machine does not have it")
sys.meta_path.insert(0, _Block())
'''


def blocking_site(tmp_path, blocked: Sequence[str]):
    """A folder with a sitecustomize.py that makes ``blocked`` packages unimportable (as on the
    GPU machine); put it first on a subprocess's PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=tuple(blocked)))
    return site


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
