"""gradwatch: watch gradients while training a TensorFlow model, and see which clipping fixes a jumping loss.

Public API (TensorFlow is imported only when training starts)::

    import gradwatch
    rows = gradwatch.run("model.keras", "train.npz", clip="global", norm=5)     # a DataFrame per step
    long = gradwatch.compare(model, (x, y), variants=["none", "global:5"], loss="mse")
    print(gradwatch.summarize(long))                                           # table + verdict

    from gradwatch.keras import GradientWatch                                  # inside your own model.fit
"""

__version__ = "0.2.0"

from .api import Summary, compare, run, summarize  # noqa: E402
from .clip import STRATEGIES, Clipping, parse_variants  # noqa: E402
from .errors import GradwatchError, Interrupted  # noqa: E402
from .session import RunSpec, prepare, resolve  # noqa: E402

__all__ = ["STRATEGIES", "Clipping", "GradwatchError", "Interrupted", "RunSpec", "Summary", "compare", "parse_variants", "prepare",
           "resolve", "run", "summarize", "__version__"]
