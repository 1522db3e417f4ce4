"""gradwatch: watch gradients while training a TensorFlow model, and see which clipping fixes a jumping loss.

Public API (TensorFlow is imported only when training starts)::

    from gradwatch import RunSpec, Clipping, STRATEGIES, resolve, prepare
    trainer = prepare(resolve(RunSpec(model="saved_model", data="train.npz", loss="mse")))
    result = trainer.run(Clipping("global", 5.0))
"""

__version__ = "0.1.0"

from .clip import STRATEGIES, Clipping, parse_variants  # noqa: E402
from .errors import GradwatchError  # noqa: E402
from .session import RunSpec, prepare, resolve  # noqa: E402

__all__ = ["STRATEGIES", "Clipping", "GradwatchError", "RunSpec", "parse_variants", "prepare", "resolve", "__version__"]
