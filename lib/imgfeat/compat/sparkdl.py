"""Databricks' retired spark-deep-learning (sparkdl) API on imgfeat: change one import.

    from sparkdl import DeepImageFeaturizer            ->   from imgfeat.compat.sparkdl import DeepImageFeaturizer

``DeepImageFeaturizer(inputCol, outputCol, modelName, scaleHint)`` takes sparkdl's parameter and model names and is
an ``imgfeat.featurize.transformer.ImageFeaturizer`` (so it saves and loads inside a ``PipelineModel``), fed by
Spark's image source (``spark.read.format("image")``, as sparkdl was) or by file bytes. It adds imgfeat's
``weights`` (``imagenet`` by default, as sparkdl had it; or ``none`` / a weights file). What sparkdl had and imgfeat
does not is an ImportError or ValueError that says so and what to use instead (docs/migrating.md).
"""

from __future__ import annotations

from typing import Any

from pyspark import keyword_only
from pyspark.ml.param.shared import Param, Params, TypeConverters

from imgfeat.featurize.transformer import ImageFeaturizer

# sparkdl model name -> imgfeat backbone (sparkdl's supported names).
MODEL_NAMES = {"InceptionV3": "inception_v3", "Xception": "xception", "ResNet50": "resnet50", "VGG16": "vgg16",
               "VGG19": "vgg19"}
# sparkdl's scaleHint (how images were resized to the model's input) -> imgfeat's resample.
SCALE_HINTS = {"SCALE_AREA_AVERAGE": "box", "SCALE_FAST": "nearest", "SCALE_DEFAULT": "bilinear",
               "SCALE_SMOOTH": "lanczos", "SCALE_REPLICATE": "nearest"}

# sparkdl classes imgfeat does not provide, and what to use instead.
NOT_PROVIDED = {
    "DeepImagePredictor": "imgfeat's backbones have no ImageNet classifier (include_top=False): featurize with "
                          "DeepImageFeaturizer and fit a head (Pipeline with LogisticRegression, or `imgfeat train`)",
    "KerasImageFileTransformer": "ImageFeaturizer with a registered backbone (imgfeat.backbones.registry.register_backbone)",
    "KerasImageFileEstimator": "fine-tuning is not part of imgfeat yet; train a head on frozen features (`imgfeat train`)",
    "KerasTransformer": "imgfeat featurizes images only; apply other Keras models with pyspark.ml.functions.predict_batch_udf",
    "TFImageTransformer": "ImageFeaturizer (Keras or PyTorch backbones; TensorFlow graphs are not loaded)",
    "TFTransformer": "pyspark.ml.functions.predict_batch_udf",
    "DeepImageFeaturizerV2": "DeepImageFeaturizer",
    "readImages": "spark.read.format('image').load(path) (Spark's own image data source)",
    "imageIO": "spark.read.format('image') or spark.read.format('binaryFile'); imgfeat decodes both",
    "registerKerasImageUDF": "ImageFeaturizer.transform, or `imgfeat extract` for folders",
}


def _backbone(model_name: str) -> str:
    if model_name in MODEL_NAMES:
        return MODEL_NAMES[model_name]
    if model_name in MODEL_NAMES.values():  # imgfeat's own name also works
        return model_name
    raise ValueError(f"DeepImageFeaturizer: unknown modelName {model_name!r}; sparkdl's names are "
                     f"{', '.join(MODEL_NAMES)} (imgfeat's own backbones, e.g. efficientnet_lite0, go to ImageFeaturizer)")


def _resample(scale_hint: str) -> str:
    if scale_hint not in SCALE_HINTS:
        raise ValueError(f"DeepImageFeaturizer: unknown scaleHint {scale_hint!r}; sparkdl's hints are {', '.join(SCALE_HINTS)}")
    return SCALE_HINTS[scale_hint]


class DeepImageFeaturizer(ImageFeaturizer):
    """sparkdl's DeepImageFeaturizer: images -> a vector of the named frozen backbone's pooled features."""

    scaleHint = Param(Params._dummy(), "scaleHint", "sparkdl's resize hint: SCALE_AREA_AVERAGE (default) | SCALE_FAST | ...",
                      TypeConverters.toString)

    @keyword_only
    def __init__(self, inputCol: str = "image", outputCol: str = "features", modelName: str = "InceptionV3",
                 scaleHint: str = "SCALE_AREA_AVERAGE", weights: str = "imagenet", **imgfeat: Any) -> None:
        given = self._input_kwargs  # (ImageFeaturizer's own keyword_only __init__ resets it)
        super().__init__()
        self._setDefault(scaleHint="SCALE_AREA_AVERAGE", inputCol="image", modelName="inception_v3", resample="box")
        self._apply(**given)

    @keyword_only
    def setParams(self, **kwargs: Any) -> DeepImageFeaturizer:
        return self._apply(**self._input_kwargs)

    def _apply(self, **kwargs: Any) -> DeepImageFeaturizer:
        if "modelName" in kwargs:
            kwargs["modelName"] = _backbone(kwargs["modelName"])
        if "scaleHint" in kwargs:
            kwargs["resample"] = _resample(kwargs["scaleHint"])
        unknown = set(kwargs) - {p.name for p in self.params}
        if unknown:
            raise ValueError(f"DeepImageFeaturizer: {', '.join(sorted(unknown))} is not a parameter here (sparkdl's are "
                             "inputCol, outputCol, modelName, scaleHint; imgfeat adds weights and ImageFeaturizer's)")
        return self._set(**kwargs)

    def setModelName(self, value: str) -> DeepImageFeaturizer:
        return self._apply(modelName=value)

    def getModelName(self) -> str:
        """sparkdl's name of the backbone (imgfeat's registry name for backbones sparkdl did not have)."""
        name = self.getOrDefault("modelName")
        return next((k for k, v in MODEL_NAMES.items() if v == name), name)

    def setScaleHint(self, value: str) -> DeepImageFeaturizer:
        return self._apply(scaleHint=value)

    def getScaleHint(self) -> str:
        return self.getOrDefault("scaleHint")


def __getattr__(name: str) -> Any:
    if name in NOT_PROVIDED:
        raise ImportError(f"imgfeat.compat.sparkdl has no {name}: {NOT_PROVIDED[name]} (see docs/migrating.md)")
    raise AttributeError(f"module 'imgfeat.compat.sparkdl' has no attribute {name!r}")
