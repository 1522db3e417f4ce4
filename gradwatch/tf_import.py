"""Import TensorFlow once, without its C++ start-up chatter on stderr.

TensorFlow's native logging prints oneDNN and CUDA notices while its libraries load, before
any TF_CPP_MIN_LOG_LEVEL takes effect; those lines would bury gradwatch's own stderr. Unless
GRADWATCH_DEBUG is set, file descriptor 2 points at /dev/null for the duration of the import
(and device discovery) only. Import errors still raise.
"""

from __future__ import annotations

import os
import sys


def tensorflow():
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if os.environ.get("GRADWATCH_DEBUG"):
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()  # device discovery logs too (CUDA probing)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    tf.get_logger().setLevel("ERROR")
    return tf
