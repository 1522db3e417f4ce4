"""Clipping strategies: one contract (base), TensorFlow's clippers (tf_ops), adaptive ones
(adaptive), and the registry that names them (registry)."""

from .base import ClipResult, dedupe, global_norm, map_values, norms, values_of
from .registry import STRATEGIES, Clipping, format_param, parse_variant_list, parse_variants

__all__ = ["STRATEGIES", "ClipResult", "Clipping", "dedupe", "format_param", "global_norm", "map_values", "norms",
           "parse_variant_list", "parse_variants", "values_of"]
