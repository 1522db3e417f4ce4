"""The registry of strategies, a strategy with its parameter (``Clipping``), and compare's variants.

The loop never special-cases a strategy: a new one is one class and one line in ``STRATEGIES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import OptionError
from .adaptive import AGC, AutoClip, ZClip
from .tf_ops import ClipByAverageNorm, ClipByGlobalNorm, ClipByNorm, ClipByValue, NoClip

# Parameters a float32 step can use: N and 1/N stay normal float32 numbers with room to spare
# (float32's normal range is about 1.2e-38 to 3.4e38).
PARAM_RANGE = (1e-30, 1e30)

STRATEGIES = {
    s.name: s
    for s in (NoClip(), ClipByValue(), ClipByNorm(), ClipByAverageNorm(), ClipByGlobalNorm(), AGC(), AutoClip(), ZClip())
}


@dataclass(frozen=True)
class Clipping:
    """A strategy with its parameter (N, V, λ, p or Z), validated once at construction."""

    strategy: str
    param: float | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise OptionError(
                f"unknown clipping strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        impl = STRATEGIES[self.strategy]
        option = impl.option
        if option is None:
            object.__setattr__(self, "param", None)
            return
        value = self.param if self.param is not None else impl.default
        if value is None:
            raise OptionError(f"--clip {self.strategy} needs a threshold: add --{option} N (N > 0)")
        value = float(value)
        upper = getattr(impl, "upper", None)
        if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
            bound = f"in (0, {upper:g}]" if upper is not None else "a finite number > 0"
            raise OptionError(f"`--{option}` must be {bound}. Received: {option}={self.param}")
        low, high = PARAM_RANGE
        if not low <= value <= high:
            raise OptionError(
                f"`--{option}` must be between {low:g} and {high:g}: clipping computes in float32, where a threshold "
                f"outside that range rounds to 0 or makes the clipping scale underflow to 0 (every gradient zeroed). "
                f"Received: {option}={self.param}"
            )
        object.__setattr__(self, "param", value)

    @property
    def impl(self):
        return STRATEGIES[self.strategy]

    @property
    def label(self) -> str:
        """Short name of the variant, as tables show it: 'global 5', 'autoclip 10', 'none'."""
        return "none" if self.param is None else f"{self.strategy} {format_param(self.param)}"


def format_param(value: float | None) -> str:
    """How a parameter appears in labels: 'none', '5', '0.25'."""
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
    for n in names:
        for v in values:
            try:
                variants.append(Clipping(n, v))
            except OptionError as exc:
                raise OptionError(f"--thresholds item {v:g} for --clip {n}: {exc}") from None
    return _unique(variants)


def parse_variant_list(text: str) -> list[Clipping]:
    """`compare --variants none,global:5,agc:0.01,autoclip:10,zclip`: exactly these variants, in
    this order; ``strategy`` alone takes the strategy's default parameter."""
    variants = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            raise OptionError(f"--variants {text!r} has an empty item; write e.g. --variants none,global:5,zclip:2.5")
        name, _, value = item.partition(":")
        name = name.strip().lower()
        variants.append(_variant_item(item, name, value))
    return _unique(variants)


def _variant_item(item: str, name: str, value: str) -> Clipping:
    """One ``--variants`` item; any error names the item."""
    if name not in STRATEGIES:
        raise OptionError(f"--variants item {item!r}: unknown clipping strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if value.strip():
        try:
            param = float(value)
        except ValueError:
            raise OptionError(f"--variants item {item!r}: {value.strip()!r} is not a number; write e.g. global:5") from None
    else:
        param = None
    if name == "none" and param is not None:
        raise OptionError(f"--variants item {item!r}: the baseline takes no parameter; write none")
    if param is None and STRATEGIES[name].option is not None and STRATEGIES[name].default is None:
        raise OptionError(f"--variants item {item!r}: {name} needs a threshold; write e.g. {name}:5")
    try:
        return Clipping(name, param)
    except OptionError as exc:
        raise OptionError(f"--variants item {item!r}: {exc}") from None


def _unique(variants: list[Clipping]) -> list[Clipping]:
    seen, out = set(), []
    for v in variants:
        if (v.strategy, v.param) not in seen:
            seen.add((v.strategy, v.param))
            out.append(v)
    if not out:
        raise OptionError("nothing to compare: give thresholds, or keep the baseline")
    return out
