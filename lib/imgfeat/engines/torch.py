"""The PyTorch engine: architectures from ``imgfeat.engines.torch_models``, weights loaded as tensors only.

Checkpoints are read with ``torch.load(..., weights_only=True)``: no pickled module or code is ever run.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from imgfeat.backbones.registry import Backbone
from imgfeat.backbones.weights import WeightsError, WeightsSource
from imgfeat.engines.base import Engine, EngineOptions, Predictor

_CONFIGURED = False


def configure_torch(threads: int = 0) -> Any:
    """Set torch's threads once per process (0 = all cores), so concurrent Spark tasks don't oversubscribe."""
    global _CONFIGURED
    import torch

    if not _CONFIGURED:
        torch.set_num_threads(threads or os.cpu_count() or 1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # parallel work already ran in this process
        _CONFIGURED = True
    return torch


def _device(torch: Any, requested: str) -> Any:
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "gpu":
        raise RuntimeError("inference.device=gpu, but torch sees no CUDA device here (torch.cuda.is_available() is False)")
    return torch.device("cpu")


class TorchEngine(Engine):
    name = "torch"
    weights_file_kind = "a PyTorch state dict (.pth)"

    def build_model(self, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None = None,
                    input_size: int | None = None) -> Any:
        import torch

        from imgfeat.engines import torch_models

        size = input_size or backbone.input_size
        if source.seed is not None:
            torch.manual_seed(source.seed)
            model = torch_models.build(backbone.constructor, size)
        else:
            model = torch_models.build(backbone.constructor, size)
            data = file_bytes if file_bytes is not None else source.read_bytes()
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                torch_models.load_weights(model, state)
            except Exception as exc:
                raise WeightsError(
                    f"could not load weights file {source.path} into {backbone.name}: {type(exc).__name__}: "
                    f"{str(exc)[:300]}. It must be a PyTorch state dict (torch.save(model.state_dict())) of the "
                    f"{backbone.constructor} architecture; files that need code to unpickle are refused."
                ) from None
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def preprocess(self, backbone: Backbone, batch: Any) -> Any:
        """(n, s, s, 3) RGB 0..255 -> (n, 3, s, s) float32 tensor, (x - mean) / std per channel."""
        import torch

        x = torch.as_tensor(np.ascontiguousarray(batch, dtype=np.float32)).permute(0, 3, 1, 2)
        mean = torch.tensor(backbone.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(backbone.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, model: Any, batch: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return model(torch.as_tensor(batch)).float().numpy()

    def _on_device(self, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None,
                   options: EngineOptions) -> tuple[Any, Any, Any, Any, Any]:
        """(torch, device, the model on it, mean and std tensors) for a predictor."""
        torch = configure_torch(options.threads)
        device = _device(torch, options.device)
        size = options.input_size or backbone.input_size
        from imgfeat.engines.torch_models import fold_batchnorm

        model = fold_batchnorm(self.build_model(backbone, source, file_bytes, input_size=size)).to(device)
        mean = torch.tensor(backbone.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(backbone.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return torch, device, model, mean, std

    def make_predictor(self, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None,
                       options: EngineOptions) -> Predictor:
        torch, device, model, mean, std = self._on_device(backbone, source, file_bytes, options)
        if options.precision == "fp16" and device.type != "cuda":
            raise RuntimeError("inference.precision=fp16 needs a GPU (torch sees no CUDA device); use bf16 on CPUs")
        if options.jpeg_decoder == "nvjpeg":
            if device.type != "cuda":
                raise RuntimeError("inference.jpeg_decoder=nvjpeg needs a CUDA device (torch sees none here); "
                                   "use inference.jpeg_decoder=pillow on CPUs")
            from imgfeat.engines.torch_jpeg import nvjpeg_decode

            nvjpeg_decode(device)  # torchvision importable: fail at model build, not on the first batch
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if options.compile:
            model = torch.compile(model, dynamic=None)
        return TorchPredictor(torch, device, model, mean, std, options.precision)

    def make_map_predictor(self, backbone: Backbone, source: WeightsSource, file_bytes: bytes | None,
                           options: EngineOptions) -> Predictor:
        """The last feature map (n, h, w, c) in float32, on the CPU or GPU as the predictor."""
        torch, device, model, mean, std = self._on_device(backbone, source, file_bytes, options)
        inputs = TorchPredictor(torch, device, model, mean, std)  # the same transfer and normalisation

        def maps(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                x = inputs.normalised(inputs.to_device(batch).permute(0, 3, 1, 2))
                return model.feature_maps(x).permute(0, 2, 3, 1).float().cpu().numpy()

        return maps


class TorchPredictor:
    """``predict(batch)``: host batches (n, s, s, 3), uint8 or float32, through pinned memory to the device (on
    CUDA) as they are, converted and normalised there; ``from_device(x)``: uint8 (n, 3, s, s) batches already on
    the device (the GPU JPEG path, ``imgfeat.engines.torch_jpeg``). bf16/fp16 autocast and channels_last (CUDA)
    as the options say."""

    def __init__(self, torch: Any, device: Any, model: Any, mean: Any, std: Any, precision: str = "fp32"):
        self.torch, self.device, self.model, self.mean, self.std = torch, device, model, mean, std
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self._pinned: dict[tuple[Any, ...], Any] = {}

    def to_device(self, batch: np.ndarray) -> Any:
        """A host batch as a tensor on the device, dtype unchanged (through a pinned buffer on CUDA)."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch))
        if self.device.type != "cuda":
            return x
        key = (tuple(x.shape), x.dtype)
        if key not in self._pinned:  # one page-locked buffer per batch shape: asynchronous copies
            self._pinned[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        staging = self._pinned[key]
        staging.copy_(x)
        return staging.to(self.device, non_blocking=True)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self._run(self.to_device(batch).permute(0, 3, 1, 2))

    def from_device(self, x: Any) -> np.ndarray:
        """Features of a uint8 (n, 3, s, s) batch on the device."""
        with self.torch.inference_mode():
            return self._run(x)

    def normalised(self, x: Any) -> Any:
        """(n, 3, s, s) 0..255 on the device -> float32, (x - mean) / std."""
        return (x.float() - self.mean) / self.std

    def _run(self, x: Any) -> np.ndarray:
        torch = self.torch
        x = self.normalised(x)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is not None:
            with torch.autocast(self.device.type, dtype=self.autocast):
                out = self.model(x)
        else:
            out = self.model(x)
        return out.float().cpu().numpy()
