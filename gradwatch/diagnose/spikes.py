"""The spike rule: when is a step's loss (or gradient norm) a jump? Written once, used by the
trainer, GradientWatch, the per-variable attribution, suggest and the reports. No TensorFlow here."""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass

from ..errors import GradwatchError


# float32 resolution: a rise within this many float32 ulps of the loss's scale is rounding, not a jump.
FLOAT32_ULPS = 64 * 2.0**-23


@dataclass(frozen=True)
class SpikeRule:
    """When is a step's loss (or global gradient norm) a jump?

    A finite value is a spike when, with at least ``min_history`` finite values before it, its
    rise above the median of the previous ``window`` finite values is larger than all three of

    - ``(factor - 1) × |median|``: with the default factor 2 the value more than doubles;
    - ``noise × MAD``, the median absolute deviation of that window: it stands out of the
      recent step-to-step noise (5 MADs, about 3.4 standard deviations of Gaussian noise), so a
      loss whose median sits near zero or below it (cosine similarity) is not a spike for
      every small rise;
    - ``floor × scale``, ``scale`` the largest magnitude the series has had so far: the
      absolute floor (1 % by default), so float32 noise around a loss that converged to ~0 is
      not a spike; never less than 64 float32 ulps of the scale.

    A non-finite value is not a spike: it is counted once, as non-finite. The median (not the
    mean) keeps one spike from hiding the next.
    """

    factor: float = 2.0
    window: int = 20
    min_history: int = 3
    floor: float = 0.01
    noise: float = 5.0

    def __post_init__(self):
        if not (math.isfinite(self.factor) and self.factor > 1):
            raise GradwatchError(f"`--spike-factor` must be > 1. Received: spike_factor={self.factor}")
        if self.window < 1:
            raise GradwatchError(f"`--spike-window` must be >= 1. Received: spike_window={self.window}")
        if not (math.isfinite(self.floor) and 0 <= self.floor < 1):
            raise GradwatchError(f"`--spike-floor` must be in [0, 1). Received: spike_floor={self.floor}")

    @property
    def history_needed(self) -> int:
        """Finite values a value needs before it to be judged (the first ones never are)."""
        return min(self.min_history, self.window)

    def detector(self) -> "SpikeDetector":
        return SpikeDetector(self)

    def mark(self, values) -> list[bool]:
        """The rule applied to a whole series (a run's losses, or its global norms)."""
        detector = self.detector()
        return [detector.update(float(x)) for x in values]


class SpikeDetector:
    """The spike rule, fed one value at a time during a run. After each :meth:`update`,
    ``median`` is the median it compared against (NaN before enough history).

    It runs once a step for every series it watches, so it is plain Python over a window kept
    sorted (``bisect``): the medians are those ``np.median`` gives (the mean of the two middle
    values of an even window), and the MAD is only worked out when the other three bounds
    have not already decided the step."""

    def __init__(self, rule: SpikeRule):
        self.rule = rule
        self.history: deque[float] = deque(maxlen=rule.window)
        self._sorted: list[float] = []  # the history, in order of size
        self._needed = rule.history_needed
        self.scale = 0.0  # the largest magnitude so far
        self.median = math.nan

    def update(self, value: float) -> bool:
        self.median = math.nan
        if not math.isfinite(value):
            return False
        spike = False
        window = self._sorted
        n = len(window)
        if n >= self._needed:
            median = _median(window)
            self.median = median
            rise = value - median
            if rise > 0:
                rule = self.rule
                needed = max((rule.factor - 1.0) * abs(median), rule.floor * self.scale, FLOAT32_ULPS * self.scale)
                spike = rise > needed and rise > rule.noise * _mad(window, median)
        if n == self.rule.window:
            del window[bisect.bisect_left(window, self.history[0])]
        bisect.insort(window, value)
        self.history.append(value)
        self.scale = max(self.scale, abs(value))
        return spike


def _median(ordered: list[float]) -> float:
    """The median of a sorted list, as ``np.median`` gives it (the mean of the two middle values)."""
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


def _mad(ordered: list[float], median: float) -> float:
    """The median absolute deviation of a window from its median."""
    return _median(sorted(abs(x - median) for x in ordered))
