"""Settings: typed dataclasses (``schema``) and the layered, validated loader (``load``).

Imports nothing of imgfeat's other layers: registries (backbones, heads) check their own names.
"""

from imgfeat.config.load import load_config, parse_set
from imgfeat.config.schema import (
    Config,
    ConfigError,
    InferenceConfig,
    InputConfig,
    KerasHeadConfig,
    ModelConfig,
    OutputConfig,
    PreprocessConfig,
    TrainConfig,
)

__all__ = [
    "Config", "ConfigError", "InferenceConfig", "InputConfig", "KerasHeadConfig", "ModelConfig", "OutputConfig",
    "PreprocessConfig", "TrainConfig", "load_config", "parse_set",
]
