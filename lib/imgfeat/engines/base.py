"""The engine interface: what the featurizer, the Transformer, ``predict`` and the bench need of a framework.

An engine builds a backbone with its weights (once per Python worker: Spark reuses workers, so models are
kept in a per-process cache), prepares a batch the way the backbone's weights expect, and runs it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgfeat.backbones.registry import Backbone
from imgfeat.backbones.weights import WeightsSource

# predict(batch) -> float32 (n, feature_dim); batch: (n, size, size, 3) RGB in 0..255, float32 or uint8.
# The torch engine's (``TorchPredictor``) also has ``device`` and ``from_device(x)`` for uint8 (n, 3, size, size)
# batches already on that device (JPEGs decoded there: ``imgfeat.engines.torch_jpeg``).
Predictor = Callable[[np.ndarray], np.ndarray]


def input_batch(arrays: list[np.ndarray], size: int) -> np.ndarray:
    """Decoded images -> one (n, size, size, 3) model batch: uint8 when every image is 8-bit (a quarter of
    float32's bytes to the model, and over PCIe to a GPU), float32 when one is high-bit-depth."""
    dtype = np.uint8 if all(a.dtype == np.uint8 for a in arrays) else np.float32
    batch = np.empty((len(arrays), size, size, 3), dtype=dtype)
    for k, a in enumerate(arrays):
        batch[k] = a
    return batch


@dataclass(frozen=True)
class EngineOptions:
    threads: int = 0  # framework intra-op threads in this process (0 = all cores)
    device: str = "auto"  # auto | cpu | gpu
    precision: str = "fp32"  # fp32 | bf16 | fp16 (GPU only)
    input_size: int | None = None  # None = the backbone's own
    compile: bool = False  # torch.compile the model (torch engine)
    jpeg_decoder: str = "pillow"  # pillow | nvjpeg (torch engine on a CUDA device: JPEGs decoded on the GPU)


class Engine(ABC):
    """One framework. Subclasses live in ``imgfeat.engines.<name>`` and import their framework lazily."""

    name: str = ""
    # What a user's weights file for this engine looks like (for error messages).
    weights_file_kind: str = ""

    @abstractmethod
    def build_model(self, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None = None,
                    input_size: int | None = None) -> Any:
        """The frozen feature model with ``source``'s weights (``file_bytes``: the shipped file, on a worker)."""

    @abstractmethod
    def preprocess(self, backbone: Backbone, batch: np.ndarray) -> Any:
        """The backbone's own input preparation of an RGB 0..255 batch (n, s, s, 3), as the model takes it."""

    @abstractmethod
    def forward(self, model: Any, batch: np.ndarray) -> np.ndarray:
        """Run an already prepared batch through ``model`` once, without compilation or caching (tests, checks)."""

    @abstractmethod
    def make_predictor(self, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None,
                       options: EngineOptions) -> Predictor:
        """Configure the framework for this process and return the batch predictor."""

    def make_map_predictor(self, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None,
                           options: EngineOptions) -> Predictor:
        """``maps(batch) -> float32 (n, h, w, feature_dim)``: the last convolutional feature map, whose spatial mean is
        what the predictor returns (class activation maps are exact because of that)."""
        raise NotImplementedError(f"the {self.name} engine has no feature-map predictor")

    def check_weights_file(self, backbone: Backbone, source: WeightsSource) -> None:
        """Load a user's weights file into the architecture once on the driver: fail here, with the file named."""
        self.build_model(backbone, source)


_PREDICTORS: dict[tuple[str, str, EngineOptions], Predictor] = {}


def cached_predictor(engine: Engine, backbone: Backbone, source: WeightsSource,
                     file_bytes: Callable[[], bytes | None], options: EngineOptions) -> Predictor:
    """The predictor for (backbone, weights, options), built on first use in this process and then reused."""
    key = (backbone.name, source.weights_id, options)
    if key not in _PREDICTORS:
        _PREDICTORS[key] = engine.make_predictor(backbone, source, file_bytes(), options)
    return _PREDICTORS[key]
