"""Resolve a weights setting (imagenet | none | FILE) into a weights id and the weight arrays.

Runs on the driver without TensorFlow where it can: ``none`` is a seed (Keras' seeded init is the same
in every process), a file is hashed and its bytes are broadcast, so no worker needs the Keras cache
or the weights file. Only weights are ever loaded: architectures are built in code, never
deserialised from a user's file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from imgfeat.backbones.registry import Backbone


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


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from, resolved on the driver without building the model.

    Either a seed (``weights: none``: seeded random init, identical in every process) or a weights
    file on the driver, whose bytes are shipped to the workers (no worker needs the Keras cache).
    """

    weights_id: str
    seed: int | None = None
    path: str | None = None

    def read_bytes(self) -> bytes | None:
        if self.path is None:
            return None
        with open(self.path, "rb") as fh:
            return fh.read()

    def build(self, backbone: Backbone, input_size: int | None = None, file_bytes: bytes | None = None) -> Any:
        """Build ``backbone`` with these weights; on a worker, pass the shipped ``file_bytes``."""
        import keras

        if self.seed is not None:
            keras.utils.set_random_seed(self.seed)
            return backbone.build(weights=None, input_size=input_size)
        model = backbone.build(weights=None, input_size=input_size)
        path = self.path
        tmp = None
        if file_bytes is not None:
            suffix = ".weights.h5" if str(self.path).endswith(".weights.h5") else ".h5"
            fd, tmp = tempfile.mkstemp(prefix="imgfeat-weights-", suffix=suffix)
            with os.fdopen(fd, "wb") as fh:
                fh.write(file_bytes)
            path = tmp
        try:
            model.load_weights(path)
        except Exception as exc:
            raise WeightsError(
                f"could not load weights file {self.path} into {backbone.name}: {type(exc).__name__}: "
                f"{str(exc)[:300]}. It must hold weights for {backbone.name} with include_top=False."
            ) from None
        finally:
            if tmp:
                os.remove(tmp)
        return model


def weights_source(
    backbone: Backbone, weights: str, seed: int = 42, pinned_sha256: str | None = None, validate: bool = True
) -> WeightsSource:
    """Resolve a weights setting; only a user's weights file is test-loaded (``validate``)."""
    spec = (weights or "").strip()
    if spec.lower() == "none":
        return WeightsSource(f"none-seed{seed}", seed=seed)
    if spec.lower() == "imagenet":
        if backbone.constructor == "tiny":
            raise WeightsError("the 'tiny' test backbone has no ImageNet weights; use --weights none")
        path = keras_cache_path(backbone)
        if not os.path.exists(path):
            import keras

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
        return WeightsSource(f"imagenet:sha256:{digest}", path=path)
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.isfile(path):
        raise WeightsError(
            f"model.weights={spec!r} is neither 'imagenet', 'none' nor an existing file; "
            "give the path of a Keras weights file (.weights.h5 or .h5) for this backbone"
        )
    digest = sha256_file(path)
    _check_pin(path, digest, pinned_sha256)
    source = WeightsSource(f"sha256:{digest}", path=path)
    if validate:
        source.build(backbone)  # fail here, with the file named, rather than in every task
    return source


def resolve_weights(backbone: Backbone, weights: str, seed: int = 42, pinned_sha256: str | None = None) -> ResolvedWeights:
    """Build ``backbone`` with the requested weights and return (weights id, arrays)."""
    source = weights_source(backbone, weights, seed, pinned_sha256, validate=False)
    return ResolvedWeights(source.weights_id, source.build(backbone).get_weights())
