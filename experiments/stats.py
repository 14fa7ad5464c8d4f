"""Statistics of the experiments: mean and standard deviation over seeds, Welch's confidence
interval for a difference of means, and the plateau criterion for "converged".

"Different" means: the 95% confidence interval of the difference of the two means (Welch's t,
unequal variances; Welch 1947) excludes 0. With three seeds per arm the interval is wide, so
"no difference found" is usually the honest outcome for effects of a point or two.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

CONFIDENCE = 0.95


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value; NaN for none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Difference:
    """``mean(a) - mean(b)`` with its Welch confidence interval and two-sided p-value."""

    diff: float
    low: float
    high: float
    p: float
    df: float
    n_a: int
    n_b: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (so at the interval's level, a and b differ)."""
        return math.isfinite(self.low) and (self.low > 0 or self.high < 0)

    def describe(self, scale: float = 100.0, unit: str = " points") -> str:
        if not math.isfinite(self.low):
            return (f"difference {scale * self.diff:+.1f}{unit} (n = {self.n_a} vs {self.n_b}: "
                    "too few seeds for an interval)")
        return (f"difference {scale * self.diff:+.1f}{unit}, {100 * CONFIDENCE:.0f}% CI "
                f"[{scale * self.low:+.1f}, {scale * self.high:+.1f}] (Welch, p = {self.p:.2g}, "
                f"n = {self.n_a} vs {self.n_b})")


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """Welch's unequal-variance t interval for ``mean(a) - mean(b)``.

    Needs at least two values per side (otherwise the interval is NaN). When both samples have
    zero variance the difference is exact: the interval is the point and p is 0 (or 1 if equal).
    """
    from scipy import special  # scipy.stats.t's own functions; importing scipy.stats costs 1 s

    x = np.asarray([v for v in a if math.isfinite(v)], np.float64)
    y = np.asarray([v for v in b if math.isfinite(v)], np.float64)
    diff = float(x.mean() - y.mean()) if x.size and y.size else math.nan
    if x.size < 2 or y.size < 2:
        return Difference(diff, math.nan, math.nan, math.nan, math.nan, x.size, y.size)
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(diff, diff, diff, 0.0 if diff else 1.0, math.inf, x.size, y.size)
    df = (va + vb) ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1))
    half = float(special.stdtrit(df, 0.5 + confidence / 2)) * se
    p = float(2 * special.stdtr(df, -abs(diff) / se))
    return Difference(diff, diff - half, diff + half, p, float(df), x.size, y.size)


# A patience no run reaches: every run trains to its epoch budget (``Plateau.stops`` is False).
NO_STOP = 10 ** 6


@dataclasses.dataclass(frozen=True)
class Plateau:
    """Converged: the best validation top-1 has not risen by more than ``min_delta`` over the
    last ``patience`` evaluations, the training loss (the loop's mean over each evaluation
    interval) has not fallen by more than ``max_loss_drop`` of itself over them, and at least
    ``min_epochs`` epochs are done.

    With ``drops`` > 0 the criterion is met ``drops + 1`` times in turn: at each of the first
    ``drops`` the learning rate is multiplied by ``factor`` (He et al. 2016: "divided by 10 when
    the error plateaus") and the next search starts after it (``patience`` evaluations at the new
    rate; ``min_epochs`` bounds the first search only); the last one is the run's plateau.

    Validation alone is not enough at a high learning rate to stop a run: its top-1 jumps by
    points from one evaluation to the next, and a run can stall on it for three evaluations while
    the training loss still falls 20% (resnet20 stopped at 55% top-1 where the same seeds later
    reached 64-73%); with drops such a stall lowers the rate instead. ``max_loss_drop=None``
    leaves the loss out. Early in a run a flat stretch is not convergence either: hence
    ``min_epochs``. Nor is one at chance in a run that has not started yet (a deep plain net or
    a DenseNet at a low rate can sit at chance for 10-15 epochs and then learn): the first
    plateau also needs the best top-1 at ``min_top1`` or more, until epoch ``stuck_epochs``,
    where a run still below it takes its first plateau as it comes.

    The bounds are epochs, not fractions of the epoch budget, so that a run's decisions do not
    depend on its budget: under a higher epoch cap a run that stopped before the old one is the
    same run, and one that reached it goes on from its last checkpoint."""

    patience: int = 4
    min_delta: float = 0.005
    min_epochs: float = 0.0
    max_loss_drop: Optional[float] = 0.05
    drops: int = 0
    factor: float = 0.1
    min_top1: float = 0.0
    stuck_epochs: float = 0.0

    @property
    def stops(self) -> bool:
        """Whether a run can stop before its epoch budget (``patience`` below ``NO_STOP``)."""
        return self.patience < NO_STOP

    def describe(self) -> str:
        if not self.stops:
            return "none: every run trains to the end of its epoch budget"
        loss = ("" if self.max_loss_drop is None else
                f" and the training loss fell by at most {100 * self.max_loss_drop:.0f}% over them")
        held = (f"the best validation top-1 rose by at most {100 * self.min_delta:.1f} points over "
                f"the last {self.patience} evaluations{loss}")
        first = f"from epoch {self.min_epochs:g}"
        if self.min_top1 > 0:
            first += (f", with the best top-1 at {100 * self.min_top1:.0f}% or more until epoch "
                      f"{self.stuck_epochs:g}")
        if not self.drops:
            return f"converged = {held}, {first}"
        times = "once" if self.drops == 1 else f"{self.drops} times"
        return (f"plateau = {held} (first {first}); at a plateau the learning rate is multiplied "
                f"by {self.factor:g} ({times}), and the run stops at the plateau after that")

    def record(self) -> dict:
        """The ``plateau`` record a stopped run keeps: the criterion that held, so that a run
        stopped under another criterion is not taken as finished under this one."""
        return {"reached": 1.0, "patience": float(self.patience), "min_delta": self.min_delta,
                "min_epochs": float(self.min_epochs),
                "max_loss_drop": -1.0 if self.max_loss_drop is None else self.max_loss_drop,
                "drops": float(self.drops), "factor": self.factor, "min_top1": self.min_top1,
                "stuck_epochs": float(self.stuck_epochs)}

    def matches(self, record: dict) -> bool:
        """Whether a ``plateau`` record was written under this criterion (one of a criterion in
        fractions of the budget, before 2026-12-06, is not: it is judged again)."""
        record = dict(record)
        if not float(record.get("drops", 0.0)):  # without drops the factor played no part
            record["factor"] = self.factor
        return all(k in record and math.isclose(float(record[k]), v)
                   for k, v in self.record().items())

    def holds(self, top1s: Sequence[float], epochs: Sequence[float],
              losses: Optional[Sequence[float]] = None) -> List[int]:
        """The evaluations (indices) at which the criterion held, in turn: at most ``drops + 1``,
        each searched after the one before. ``epochs``: the epoch of each evaluation;
        ``losses``: the training loss at each (required unless ``max_loss_drop`` is None)."""
        if self.max_loss_drop is not None and losses is None:
            raise ValueError("this plateau criterion needs the training loss at each evaluation")
        best = -math.inf
        history = []  # best-so-far after each evaluation
        found: List[int] = []
        for i, (t, e) in enumerate(zip(top1s, epochs)):
            best = max(best, t)
            history.append(best)
            start = found[-1] if found else 0  # the patience window lies after the last hold
            if len(found) > self.drops or i - start < self.patience or \
                    (not found and (e < self.min_epochs or (
                        best < self.min_top1 and e < self.stuck_epochs))) or \
                    history[i] - history[i - self.patience] > self.min_delta:
                continue
            if self.max_loss_drop is not None:
                before, now = losses[i - self.patience], losses[i]
                if not (math.isfinite(before) and math.isfinite(now)) or \
                        before - now > self.max_loss_drop * abs(before):
                    continue
            found.append(i)
        return found

    def index(self, top1s: Sequence[float], epochs: Sequence[float],
              losses: Optional[Sequence[float]] = None) -> Optional[int]:
        """The evaluation (index) at which the run's plateau held (after ``drops`` holds that
        lowered the learning rate), or None."""
        return self._stop(self.holds(top1s, epochs, losses))

    def _stop(self, holds: List[int]) -> Optional[int]:
        """The last of ``holds`` if it is the run's plateau (the one after every drop)."""
        return holds[-1] if len(holds) > self.drops else None

    def index_of(self, evaluations: Sequence[Tuple[int, float, float]],
                 steps_per_epoch: int) -> Optional[int]:
        """:meth:`index` over a run's evaluations as (step, val top-1, training loss), in a run of
        ``steps_per_epoch`` steps an epoch."""
        return self._stop(self.holds_of(evaluations, steps_per_epoch))

    def holds_of(self, evaluations: Sequence[Tuple[int, float, float]],
                 steps_per_epoch: int) -> List[int]:
        """:meth:`holds` over a run's evaluations as (step, val top-1, training loss)."""
        if not evaluations:
            return []
        steps, top1s, losses = zip(*evaluations)
        return self.holds(top1s, [s / steps_per_epoch for s in steps], losses)
