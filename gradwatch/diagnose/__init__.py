"""Which variable drove a spike, which layer updates too fast, which threshold to set.

Nothing here imports TensorFlow: `gradwatch report --layers` rebuilds all of it from CSVs.
"""

from .attribution import LAYER_COLUMNS, LayerWatch, Spike
from .suggest import Suggestion, suggest_threshold

__all__ = ["LAYER_COLUMNS", "LayerWatch", "Spike", "Suggestion", "suggest_threshold"]
