"""This host's CPU as XLA:CPU sees it.

XLA:CPU compiles for the CPU it runs on: the model and its widest vector instructions pick the
kernels, and with them a step's speed and the order of its float32 sums. So a training run
reproduces to the digit only on the same kind of CPU (on another, its numbers are another draw of
rounding), and a timing means little without the CPU beside it.
"""

from __future__ import annotations

import functools
import platform
from typing import Dict, FrozenSet


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields of Linux's /proc/cpuinfo; {} where that file is missing."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():  # the first processor ends at the first blank line
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags() -> FrozenSet[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def has_avx512_bf16() -> bool:
    """Whether the CPU has AVX-512's bfloat16 dot-product instructions (``avx512_bf16``)."""
    return "avx512_bf16" in cpu_flags()


def has_amx_bf16() -> bool:
    """Whether the CPU has AMX's bfloat16 tile products (``amx_bf16``, Intel Xeon from Sapphire
    Rapids): oneDNN, and so torch's CPU autocast, runs bf16 convolutions on them."""
    return "amx_bf16" in cpu_flags()


def vector_isa() -> str:
    """The widest x86 vector extension the CPU has ("AVX-512", "AVX2", "AVX"), else ""."""
    flags = cpu_flags()
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return name
    return ""


def cpu_name() -> str:
    """The CPU's model name with what tells two of one name apart, e.g.
    ``AMD EPYC (family 25 model 17, AVX-512)``, ``Intel(R) Xeon(R) Processor (family 6 model
    207, AVX-512, AMX)``; where Linux's /proc/cpuinfo is missing, what ``platform`` knows."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    details = []
    if info.get("cpu family") and info.get("model"):
        details.append(f"family {info['cpu family']} model {info['model']}")
    isa = vector_isa()
    if isa:
        details.append(isa)
    if has_amx_bf16():  # bf16 matrix tiles: torch's bf16 convolutions run several times faster
        details.append("AMX")
    return f"{name} ({', '.join(details)})" if details else name
