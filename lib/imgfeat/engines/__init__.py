"""Inference engines: build a backbone once per Python worker and run it on image batches, one module per framework.

``keras`` (TensorFlow-backed Keras 3, today's engine) and ``torch`` (PyTorch) implement ``base.Engine``. Modules
are imported on first use, so importing this package loads no framework. A new framework goes in a module of
its own, a class implementing ``Engine``, and a line in ``_MODULES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from imgfeat.backbones.registry import Backbone, get_backbone
from imgfeat.backbones.weights import WeightsSource, weights_source
from imgfeat.engines.base import Engine, EngineOptions, Predictor, cached_predictor

_MODULES = {"keras": "imgfeat.engines.keras:KerasEngine", "torch": "imgfeat.engines.torch:TorchEngine"}
_INSTANCES: dict[str, Engine] = {}


def get_engine(name: str) -> Engine:
    """The engine ``name`` (keras | torch)."""
    if name not in _INSTANCES:
        if name not in _MODULES:
            raise ValueError(f"unknown engine {name!r}; available: {', '.join(_MODULES)}")
        module, cls = _MODULES[name].split(":")
        _INSTANCES[name] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[name]


def engine_of(backbone: Backbone) -> Engine:
    return get_engine(backbone.engine)


def resolve_weights(backbone: Backbone, weights: str, seed: int = 42, pinned_sha256: str | None = None,
                    validate: bool = True) -> WeightsSource:
    """Resolve a weights setting on the driver; a user's file is also test-loaded (``validate``) so that a
    wrong file fails once, here, with its name, rather than in every task."""
    source = weights_source(backbone, weights, seed, pinned_sha256)
    if validate and source.is_user_file:
        engine_of(backbone).check_weights_file(backbone, source)
    return source


def get_predictor(model_name: str, source: WeightsSource, file_bytes: Callable[[], bytes | None],
                  options: EngineOptions) -> Predictor:
    """``predict(batch_0_255) -> float32 features`` for ``model_name``, built once per process."""
    backbone = get_backbone(model_name)
    return cached_predictor(engine_of(backbone), backbone, source, file_bytes, options)


__all__ = ["Engine", "EngineOptions", "Predictor", "engine_of", "get_engine", "get_predictor", "resolve_weights"]
