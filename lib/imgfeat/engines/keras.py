"""Worker-side model runtime: TensorFlow set-up and one model per Python worker process.

Spark reuses Python workers between tasks (spark.python.worker.reuse), so the model is built once
per worker and kept in a module-level cache keyed by backbone and weights id.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from imgfeat.backbones.registry import get_backbone
from imgfeat.backbones.weights import WeightsSource

_MODELS: dict[tuple[str, str, str, bool, int | None], Callable[[np.ndarray], np.ndarray]] = {}
_TF_CONFIGURED = False


def configure_tensorflow(threads: int = 0, device: str = "auto") -> Any:
    """Set TF threads (0 = all cores) and GPU behaviour once per process, before TF starts its runtime."""
    global _TF_CONFIGURED
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if _TF_CONFIGURED:
        return tf
    n = threads or os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, n)))
    except RuntimeError:
        pass  # runtime already initialised in this process (e.g. a test built a model first)
    try:
        gpus = tf.config.list_physical_devices("GPU")
        if device == "cpu" and gpus:
            tf.config.set_visible_devices([], "GPU")
        else:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        pass
    _TF_CONFIGURED = True
    return tf


def get_predictor(
    model_name: str,
    source: WeightsSource,
    file_bytes: Callable[[], bytes | None],
    threads: int = 0,
    device: str = "auto",
    mixed_precision: bool = False,
    input_size: int | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """Return ``predict(batch_0_255) -> float32 features``, building the model once per process."""
    key = (model_name, source.weights_id, device, mixed_precision, input_size)
    if key in _MODELS:
        return _MODELS[key]
    tf = configure_tensorflow(threads, device)
    import keras

    backbone = get_backbone(model_name)
    if mixed_precision and tf.config.list_physical_devices("GPU"):
        keras.mixed_precision.set_global_policy("mixed_float16")
    size = input_size or backbone.input_size
    model = source.build(backbone, input_size=size, file_bytes=file_bytes())

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], reduce_retracing=True)
    def _infer(x: Any) -> Any:
        return tf.cast(model(x, training=False), tf.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        x = backbone.preprocess(np.ascontiguousarray(batch, dtype=np.float32))
        return _infer(tf.convert_to_tensor(x, dtype=tf.float32)).numpy()

    _MODELS[key] = predict
    return predict
