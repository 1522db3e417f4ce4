"""The spike rule: when is a step's loss (or gradient norm) a jump? Written once, used by the
trainer, GradientWatch, the per-variable attribution, suggest and the reports. No TensorFlow here."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import GradwatchError


@dataclass(frozen=True)
class SpikeRule:
    """When is the loss of a step a jump?

    A step's loss is a spike when it is not finite, or when, with at least ``min_history``
    finite losses before it, it exceeds the median of the previous ``window`` finite losses
    by more than ``(factor - 1)`` times that median's magnitude: with the defaults, the loss
    more than doubles against its recent typical value. The median (not the mean) keeps one
    spike from hiding the next.
    """

    factor: float = 2.0
    window: int = 20
    min_history: int = 3

    def __post_init__(self):
        if not (math.isfinite(self.factor) and self.factor > 1):
            raise GradwatchError(f"`--spike-factor` must be > 1. Received: spike_factor={self.factor}")
        if self.window < 1:
            raise GradwatchError(f"`--spike-window` must be >= 1. Received: spike_window={self.window}")

    def detector(self) -> "SpikeDetector":
        return SpikeDetector(self)

    def mark(self, losses) -> list[bool]:
        """The rule applied to a whole loss series (used by tests and by `report`)."""
        detector = self.detector()
        return [detector.update(float(x)) for x in losses]


class SpikeDetector:
    """The spike rule, fed one loss at a time during a run."""

    def __init__(self, rule: SpikeRule):
        self.rule = rule
        self.history: deque[float] = deque(maxlen=rule.window)

    def update(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        spike = False
        if len(self.history) >= min(self.rule.min_history, self.rule.window):
            median = float(np.median(self.history))
            spike = loss - median > (self.rule.factor - 1.0) * abs(median)
        self.history.append(loss)
        return spike
