"""The registry of strategies, a strategy with its parameter (``Clipping``), and compare's variants.

The loop never special-cases a strategy: a new one is one class and one line in ``STRATEGIES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import OptionError
from .tf_ops import ClipByAverageNorm, ClipByGlobalNorm, ClipByNorm, ClipByValue, NoClip

STRATEGIES = {s.name: s for s in (NoClip(), ClipByValue(), ClipByNorm(), ClipByAverageNorm(), ClipByGlobalNorm())}


@dataclass(frozen=True)
class Clipping:
    """A strategy with its threshold, validated once at construction."""

    strategy: str
    threshold: float | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise OptionError(
                f"unknown clipping strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        option = STRATEGIES[self.strategy].option
        if option is None:
            object.__setattr__(self, "threshold", None)
            return
        if self.threshold is None:
            raise OptionError(f"--clip {self.strategy} needs a threshold: add --{option} N (N > 0)")
        value = float(self.threshold)
        if not math.isfinite(value) or value <= 0:
            raise OptionError(f"`--{option}` must be a finite number > 0. Received: {option}={self.threshold}")
        object.__setattr__(self, "threshold", value)

    @property
    def impl(self):
        return STRATEGIES[self.strategy]

    @property
    def label(self) -> str:
        """Short name of the variant, as tables and the CSV show it: 'global 5', 'none'."""
        return "none" if self.threshold is None else f"{self.strategy} {format_threshold(self.threshold)}"


def format_threshold(value: float | None) -> str:
    """How a threshold appears in tables and CSV cells: 'none', '5', '0.25'."""
    if value is None:
        return "none"
    return f"{value:g}"


def parse_variants(strategies: str, thresholds: str, baseline: bool = True) -> list[Clipping]:
    """`compare`'s variants: every strategy x every threshold; 'none' is the unclipped baseline,
    added first unless ``baseline`` is False or the list names it."""
    names = [s.strip() for s in strategies.split(",")]
    items = [t.strip().lower() for t in thresholds.split(",")]
    if any(not n for n in names):
        raise OptionError(f"--clip {strategies!r} has an empty item; write e.g. --clip global,norm")
    if any(not t for t in items):
        raise OptionError(f"--thresholds {thresholds!r} has an empty item; write e.g. --thresholds none,1,5,10")
    for n in names:
        if n not in STRATEGIES or n == "none":
            raise OptionError(f"--clip {n!r} is not a clipping strategy; choose from {', '.join(s for s in STRATEGIES if s != 'none')}")
    values = []
    for t in items:
        if t == "none":
            continue
        try:
            values.append(float(t))
        except ValueError:
            raise OptionError(f"--thresholds item {t!r} is not a number or 'none'; write e.g. --thresholds none,1,5,10") from None
    variants = [Clipping("none")] if baseline or "none" in items else []
    seen = set()
    for n in names:
        for v in values:
            clipping = Clipping(n, v)
            if (n, clipping.threshold) not in seen:
                seen.add((n, clipping.threshold))
                variants.append(clipping)
    if not variants:
        raise OptionError("nothing to compare: give thresholds, or keep the baseline")
    return variants
