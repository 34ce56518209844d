"""Registry of frozen ImageNet backbones, by name. Importing this module does not import TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgfeat.config import ConfigError

_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications"


@dataclass(frozen=True)
class Backbone:
    name: str
    input_size: int
    feature_dim: int
    # keras.applications constructor and preprocessing module, resolved lazily.
    constructor: str
    preprocess_module: str
    # File name in the Keras cache (~/.keras/models) and where Keras downloads it from.
    imagenet_file: str
    imagenet_url: str

    def build(self, weights: str | None = None, input_size: int | None = None) -> Any:
        """The frozen feature model: include_top=False, global average pooling.

        ``input_size`` may differ from the default: the weights do not depend on it.
        """
        keras = _keras()
        size = input_size or self.input_size
        if self.constructor == "tiny":
            return _build_tiny(keras, size, self.feature_dim)
        ctor = getattr(keras.applications, self.constructor)
        model = ctor(
            include_top=False,
            weights=weights,
            input_shape=(size, size, 3),
            pooling="avg",
        )
        model.trainable = False
        return model

    def preprocess(self, batch: Any) -> Any:
        """The backbone's own ``preprocess_input`` on a float32 (n, s, s, 3) batch in 0..255."""
        if self.preprocess_module == "tiny":
            return batch / 127.5 - 1.0
        keras = _keras()
        module = getattr(keras.applications, self.preprocess_module)
        return module.preprocess_input(batch)


def _keras() -> Any:
    import keras

    return keras


def _build_tiny(keras: Any, size: int, dim: int) -> Any:
    """A very small CNN with the same interface, for fast tests (never for real features)."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.Conv2D(dim, 3, strides=2, activation="relu")(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, outputs, name="tiny")
    model.trainable = False
    return model


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone(
            "resnet50", 224, 2048, "ResNet50", "resnet50",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            f"{_KERAS_WEIGHTS}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "inception_v3", 299, 2048, "InceptionV3", "inception_v3",
            "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            f"{_KERAS_WEIGHTS}/inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "densenet121", 224, 1024, "DenseNet121", "densenet",
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            f"{_KERAS_WEIGHTS}/densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "vgg19", 224, 512, "VGG19", "vgg19",
            "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            f"{_KERAS_WEIGHTS}/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "efficientnet_b0", 224, 1280, "EfficientNetB0", "efficientnet",
            "efficientnetb0_notop.h5",
            f"{_KERAS_WEIGHTS}/efficientnet/efficientnetb0_notop.h5",
        ),
        # Test-only: tiny, random-weights only.
        Backbone("tiny", 32, 16, "tiny", "tiny", "", ""),
    ]
}


def get_backbone(name: str) -> Backbone:
    """The registered backbone ``name``; a ConfigError naming ``model.name`` and the choices otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(
            f"model.name: unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}"
        ) from None


def register_backbone(backbone: Backbone) -> None:
    """Add a backbone under a new name (e.g. a keras.applications model not listed above)."""
    BACKBONES[backbone.name] = backbone
