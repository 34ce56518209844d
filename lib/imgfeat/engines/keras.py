"""The Keras engine: keras.applications backbones (Keras 3), frozen, global average pooling.

TensorFlow is the backend by default (a compiled ``tf.function`` per worker). Under ``KERAS_BACKEND=torch`` (or
jax) the same backbones and weights files run through Keras' own call (docs/engines.md has what it measured).
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from imgfeat.backbones.registry import Backbone
from imgfeat.backbones.weights import WeightsError, WeightsSource
from imgfeat.engines.base import Engine, EngineOptions, Predictor

_TF_CONFIGURED = False

# Libraries Keras 3 imports at start-up only when it finds them installed, for features the engine never uses:
# scikit-learn for keras.wrappers' estimators (it brings scipy.stats), matplotlib for keras.visualization's plots.
# Skipping them makes `import tensorflow` in a worker markedly cheaper (docs/benchmarks.md).
OPTIONAL_AT_IMPORT = ("sklearn", "matplotlib")


class _SkipAtImport(importlib.abc.MetaPathFinder):
    """Makes the first import of the named top-level packages fail, as if they were not installed."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname.partition(".")[0] in self.names:
            raise ImportError(f"{fullname} is not imported with Keras by imgfeat's engine")
        return None


@contextmanager
def _lean_import() -> Iterator[None]:
    skip = tuple(name for name in OPTIONAL_AT_IMPORT if name not in sys.modules)
    finder = _SkipAtImport(skip)
    if skip:
        sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        if skip:
            sys.meta_path.remove(finder)


def import_keras() -> Any:
    """``import keras`` (with TensorFlow, its default backend) without Keras' optional scikit-learn and matplotlib
    integrations, unless they are loaded already: every Python worker pays the import, and the engine uses neither.
    Only Keras' own references to them stay empty (keras.wrappers, keras.visualization); importing them later works
    as usual."""
    if "keras" in sys.modules:
        return sys.modules["keras"]
    with _lean_import():
        import keras
    return keras


def import_tensorflow() -> Any:
    """``import tensorflow`` the way :func:`import_keras` imports Keras (TensorFlow imports Keras 3 itself)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with _lean_import():
        import tensorflow
    return tensorflow


def configure_tensorflow(threads: int = 0, device: str = "auto") -> Any:
    """Set TF threads (0 = all cores) and GPU behaviour once per process, before TF starts its runtime."""
    global _TF_CONFIGURED
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = import_tensorflow()

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


def _build_tiny(keras: Any, size: int, dim: int) -> Any:
    """A very small CNN with the same interface, for fast tests (never for real features)."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.Conv2D(dim, 3, strides=2, activation="relu")(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, outputs, name="tiny")
    model.trainable = False
    return model


def build_architecture(backbone: Backbone, input_size: int | None = None) -> Any:
    """The frozen feature model with freshly initialised weights: include_top=False, global average pooling.

    ``input_size`` may differ from the default: the weights do not depend on it.
    """
    keras = import_keras()

    size = input_size or backbone.input_size
    if backbone.constructor == "tiny":
        return _build_tiny(keras, size, backbone.feature_dim)
    ctor = getattr(keras.applications, backbone.constructor)
    model = ctor(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
    model.trainable = False
    return model


class KerasEngine(Engine):
    name = "keras"
    weights_file_kind = "a Keras weights file (.weights.h5 or .h5)"

    def build_model(self, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None = None,
                    input_size: int | None = None) -> Any:
        keras = import_keras()

        if source.seed is not None:
            keras.utils.set_random_seed(source.seed)
            return build_architecture(backbone, input_size)
        model = build_architecture(backbone, input_size)
        path, tmp = source.path, None
        if file_bytes is not None:
            suffix = ".weights.h5" if str(source.path).endswith(".weights.h5") else ".h5"
            fd, tmp = tempfile.mkstemp(prefix="imgfeat-weights-", suffix=suffix)
            with os.fdopen(fd, "wb") as fh:
                fh.write(file_bytes)
            path = tmp
        try:
            model.load_weights(path)
        except Exception as exc:
            raise WeightsError(
                f"could not load weights file {source.path} into {backbone.name}: {type(exc).__name__}: "
                f"{str(exc)[:300]}. It must hold weights for {backbone.name} with include_top=False."
            ) from None
        finally:
            if tmp:
                os.remove(tmp)
        return model

    def preprocess(self, backbone: Backbone, batch: Any) -> Any:
        """The backbone's own ``preprocess_input`` on a float32 (n, s, s, 3) batch in 0..255 (never in place:
        keras.applications' "caffe" preprocessing subtracts its means from a NumPy input in place)."""
        if backbone.preprocess_module == "tiny":
            return batch / 127.5 - 1.0
        keras = import_keras()

        batch = np.array(batch, dtype=np.float32, copy=True) if isinstance(batch, np.ndarray) else batch
        return getattr(keras.applications, backbone.preprocess_module).preprocess_input(batch)

    def forward(self, model: Any, batch: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(batch, verbose=0), dtype=np.float32)

    def make_predictor(self, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None,
                       options: EngineOptions) -> Predictor:
        keras = import_keras()

        if keras.backend.backend() != "tensorflow":
            return self._backend_predictor(keras, backbone, source, file_bytes, options)
        tf = configure_tensorflow(options.threads, options.device)
        size = options.input_size or backbone.input_size
        policy = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[options.precision]
        if options.precision == "fp16" and not tf.config.list_physical_devices("GPU"):
            raise RuntimeError("inference.precision=fp16 needs a GPU (TensorFlow sees none); use bf16 on CPUs")
        model = self.build_model(backbone, source, file_bytes, input_size=size)  # float32: the weights as given
        if policy != "float32":
            # The same weights in a model built under the policy (building under it directly would draw a seeded
            # init differently); the process-wide default goes back to float32.
            keras.mixed_precision.set_global_policy(policy)
            try:
                mixed = build_architecture(backbone, size)
            finally:
                keras.mixed_precision.set_global_policy("float32")
            mixed.set_weights(model.get_weights())
            model = mixed

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], reduce_retracing=True)
        def _infer(x: Any) -> Any:
            return tf.cast(model(x, training=False), tf.float32)

        def predict(batch: np.ndarray) -> np.ndarray:
            x = self.preprocess(backbone, batch)
            return _infer(tf.convert_to_tensor(x, dtype=tf.float32)).numpy()

        return predict

    def _backend_predictor(self, keras: Any, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None,
                           options: EngineOptions) -> Predictor:
        """Keras on another backend (KERAS_BACKEND=torch): no tf.function, Keras' own call; threads set for torch."""
        if keras.backend.backend() == "torch":
            from imgfeat.engines.torch import configure_torch

            configure_torch(options.threads)
        model = self.build_model(backbone, source, file_bytes, input_size=options.input_size or backbone.input_size)

        def predict(batch: np.ndarray) -> np.ndarray:
            x = self.preprocess(backbone, np.ascontiguousarray(batch, dtype=np.float32))
            return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float32)

        return predict

    def make_map_predictor(self, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None,
                           options: EngineOptions) -> Predictor:
        """The input of the final GlobalAveragePooling2D (n, h, w, c): the feature map the features average."""
        keras = import_keras()

        if keras.backend.backend() == "tensorflow":
            configure_tensorflow(options.threads, options.device)
        model = self.build_model(backbone, source, file_bytes, input_size=options.input_size or backbone.input_size)
        pool = model.layers[-1]
        if not isinstance(pool, keras.layers.GlobalAveragePooling2D):
            raise NotImplementedError(f"{backbone.name}: the last layer is {type(pool).__name__}, not global average pooling")
        maps_model = keras.Model(model.input, pool.input)

        def maps(batch: np.ndarray) -> np.ndarray:
            x = self.preprocess(backbone, np.ascontiguousarray(batch, dtype=np.float32))
            return np.asarray(keras.ops.convert_to_numpy(maps_model(x, training=False)), dtype=np.float32)

        return maps
