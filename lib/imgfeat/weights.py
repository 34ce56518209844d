"""Resolve a weights setting (imagenet | none | FILE) into a weights id and the weight arrays.

Runs on the driver; the arrays are broadcast so every worker uses bit-identical weights and no
worker needs the Keras cache or the weights file. Only weights are ever loaded: architectures are
built in code, never deserialised from a user's file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from imgfeat.backbones import Backbone


class WeightsError(RuntimeError):
    """Weights are missing, unreadable or do not match their pinned sha256."""


@dataclass
class ResolvedWeights:
    weights_id: str  # e.g. "none-seed42", "imagenet:sha256:<hex>", "sha256:<hex>"
    arrays: list[Any]  # numpy arrays, as model.get_weights()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def keras_cache_path(backbone: Backbone) -> str:
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models", backbone.imagenet_file)


def _check_pin(path: str, digest: str, pinned: str | None) -> None:
    if pinned and digest.lower() != pinned.lower():
        raise WeightsError(
            f"weights file {path} has sha256 {digest}, but model.weights_sha256 pins {pinned.lower()}; "
            "the file changed or is not the one you meant. Replace the file or update the pin."
        )


def resolve_weights(backbone: Backbone, weights: str, seed: int = 42, pinned_sha256: str | None = None) -> ResolvedWeights:
    """Build ``backbone`` with the requested weights and return (weights id, arrays)."""
    import keras

    spec = (weights or "").strip()
    if spec.lower() == "none":
        keras.utils.set_random_seed(seed)
        model = backbone.build(weights=None)
        return ResolvedWeights(f"none-seed{seed}", model.get_weights())
    if spec.lower() == "imagenet":
        if backbone.constructor == "tiny":
            raise WeightsError("the 'tiny' test backbone has no ImageNet weights; use --weights none")
        path = keras_cache_path(backbone)
        if not os.path.exists(path):
            try:
                keras.utils.get_file(backbone.imagenet_file, backbone.imagenet_url, cache_subdir="models")
            except Exception as exc:  # no network, proxy, disk ...
                raise WeightsError(
                    f"ImageNet weights for {backbone.name} are not in the Keras cache and could not be "
                    f"downloaded ({type(exc).__name__}: {str(exc)[:200]}). Download {backbone.imagenet_url} "
                    f"and place it at {path} (or set KERAS_HOME), or pass --weights /path/to/file.h5, or "
                    "--weights none for random (meaningless) features."
                ) from None
        digest = sha256_file(path)
        _check_pin(path, digest, pinned_sha256)
        model = backbone.build(weights=None)
        model.load_weights(path)
        return ResolvedWeights(f"imagenet:sha256:{digest}", model.get_weights())
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise WeightsError(
            f"model.weights={spec!r} is neither 'imagenet', 'none' nor an existing file; "
            "give the path of a Keras weights file (.weights.h5 or .h5) for this backbone"
        )
    digest = sha256_file(path)
    _check_pin(path, digest, pinned_sha256)
    model = backbone.build(weights=None)
    try:
        model.load_weights(path)
    except Exception as exc:
        raise WeightsError(
            f"could not load weights file {path} into {backbone.name}: {type(exc).__name__}: {str(exc)[:300]}. "
            f"It must hold weights for {backbone.name} with include_top=False."
        ) from None
    return ResolvedWeights(f"sha256:{digest}", model.get_weights())
