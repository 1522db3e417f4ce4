"""Clipping strategies: one contract (base), TensorFlow's clippers (tf_ops), the registry."""

from .base import ClipResult, dedupe, global_norm, map_values, values_of
from .registry import STRATEGIES, Clipping, format_threshold, parse_variants

__all__ = ["STRATEGIES", "ClipResult", "Clipping", "dedupe", "format_threshold", "global_norm", "map_values",
           "parse_variants", "values_of"]
