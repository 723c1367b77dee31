"""TensorFlow process settings: threads per process and GPU memory growth, set once before the first operation."""

from __future__ import annotations

import logging

import tensorflow as tf

log = logging.getLogger(__name__)
_configured: str | None = None


def configure_tensorflow(threads: int) -> str:
    """Limit TensorFlow to `threads` threads and let GPU memory grow; returns the device it will use. Idempotent."""
    global _configured
    if _configured is not None:
        return _configured
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # TensorFlow already ran an operation in this process: its settings are fixed
        log.warning("TensorFlow was initialised before its thread settings could be applied: %s", exc)
        gpus = tf.config.list_physical_devices("GPU")
    _configured = f"GPU ({gpus[0].name})" if gpus else f"CPU ({threads} thread(s))"
    return _configured
