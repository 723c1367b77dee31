"""TensorFlow process settings: threads per process, which GPU and its memory growth, mixed precision; set once
before the first operation."""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

log = logging.getLogger(__name__)
_devices: tuple[str, bool] | None = None  # (the device in words, whether it is a GPU), fixed at the first call


def configure_tensorflow(threads: int, gpu: int = 0, mixed_precision: bool = False) -> str:
    """Limit TensorFlow to `threads` threads; use GPU number `gpu` where TensorFlow sees one, its memory growing as
    needed (so several processes can share a card), in mixed precision if asked; else the CPU, saying so. Returns
    the device in words.

    Threads and device are fixed at the first call (TensorFlow allows no change once it ran); the precision policy is
    set on every call, so a long-lived process serving run after run follows each run's `mixed-precision`."""
    global _devices
    if _devices is None:
        _devices = _set_devices(threads, gpu)
    device, on_gpu = _devices
    keras.mixed_precision.set_global_policy("mixed_float16" if on_gpu and mixed_precision else "float32")  # logits stay float32
    return f"{device}, mixed precision" if on_gpu and mixed_precision else device


def _set_devices(threads: int, gpu: int) -> tuple[str, bool]:
    """Threads, the visible GPU and its memory growth; the device in words and whether it is a GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        if gpus:
            chosen = gpus[gpu] if gpu < len(gpus) else gpus[0]
            if gpu >= len(gpus):
                log.warning("GPU %d asked for, TensorFlow sees %d: using GPU 0", gpu, len(gpus))
            tf.config.set_visible_devices(chosen, "GPU")
            tf.config.experimental.set_memory_growth(chosen, True)
            gpus = [chosen]
    except RuntimeError as exc:  # TensorFlow already ran an operation in this process: its settings are fixed
        log.warning("TensorFlow was initialised before its device settings could be applied: %s", exc)
    if not gpus:
        log.info("no GPU visible to TensorFlow: training on the CPU with %d thread(s)", threads)
        return f"CPU ({threads} thread(s))", False
    return f"GPU ({gpus[0].name})", True
