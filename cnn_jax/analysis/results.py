"""What an analysis returns: one row per layer, the totals, and the rows' container."""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, List, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One row: a conv/dense/pooling primitive or a leaf module (norm, dropout, ...)."""

    name: str  # module path, e.g. "layer1_0/conv1"; "<scope>/max_pool_0" for functions
    kind: str  # conv, dense, matmul, max_pool, avg_pool, global_avg_pool, batch_norm, params, ...
    module: str  # class of the module that emitted it ("" for the top-level scope)
    output_shape: Tuple[int, ...]
    params: int
    macs: int  # the papers' and torchvision's convention: every kernel tap, padding included
    valid_macs: int = 0  # only taps that land on the input, not on padding (XLA's count)
    rf_size: Tuple[float, ...] = ()  # per input spatial axis (H, W); () when input-independent
    rf_jump: Tuple[float, ...] = ()
    rf_start: Tuple[float, ...] = ()
    kernel: Optional[Tuple[int, ...]] = None  # spatial window of a conv / pool
    strides: Optional[Tuple[int, ...]] = None
    in_features: Optional[int] = None  # conv/dense input channels (all groups)
    out_features: Optional[int] = None
    groups: Optional[int] = None
    depth: int = 0  # longest chain of weight layers from the input up to and including this row
    has_weights: bool = False  # a conv/dense whose kernel is a parameter (shared ones too)


@dataclasses.dataclass(frozen=True)
class Totals:
    params: int  # trainable: every leaf of variables["params"]
    state: int  # other variables (batch-norm statistics)
    macs: int
    valid_macs: int
    weight_layers: int
    depth: int

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Rows in program order plus totals; iterating yields the rows."""

    model: str
    input_shape: Tuple[int, ...]
    layers: Tuple[LayerInfo, ...]
    totals: Totals
    notes: Tuple[str, ...] = ()

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def find(self, name: str) -> LayerInfo:
        """The row called ``name``."""
        for row in self.layers:
            if row.name == name:
                return row
        examples = ", ".join(repr(r.name) for r in self.layers[:3])
        raise KeyError(f"no layer {name!r}; names look like {examples or '(no layers)'}")

    def select(self, pattern: str = ".*", kinds: Optional[Sequence[str]] = None) -> List[LayerInfo]:
        """Rows whose name matches the regular expression (``re.search``) and, if given, kinds."""
        rx = re.compile(pattern)
        return [r for r in self.layers if rx.search(r.name) and (kinds is None or r.kind in kinds)]
