"""PyTorch architectures, defined in code: torchvision's ResNet-50 and DenseNet-121 (same parameter names, so
torchvision's ImageNet checkpoints load), EfficientNet-Lite0 from ``efficientnet-lite-pytorch``, and a tiny test net.

torchvision itself is not used: its wheels do not import with the CPU torch build that every machine here
has (``operator torchvision::nms does not exist``). Each network keeps its classifier, so full checkpoints load
strictly; ``forward`` returns the globally average-pooled features the classifier would see, ``feature_maps`` the
map they are the spatial mean of (for class activation maps).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 convolution), as torchvision.models.resnet.Bottleneck."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet with Bottleneck blocks; ``forward`` -> pooled features (n, 2048)."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map (n, 2048, h, w); ``forward`` is its spatial mean."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.feature_maps(x)), 1)

    def blocks(self) -> list[nn.Module]:
        """The feature layers in order, for fine-tuning the last K (the ImageNet classifier ``fc`` is not used)."""
        return [self.conv1, self.bn1, *self.layer1, *self.layer2, *self.layer3, *self.layer4]

    def conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """(module, convolution, the BatchNorm that takes its output) for ``fold_batchnorm``."""
        pairs = [(self, "conv1", "bn1")]
        for block in [*self.layer1, *self.layer2, *self.layer3, *self.layer4]:
            pairs += [(block, "conv1", "bn1"), (block, "conv2", "bn2"), (block, "conv3", "bn3")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
        return pairs


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(nn.Module):
    """torchvision.models.DenseNet (121: growth 32, blocks 6-12-24-16); ``forward`` -> pooled features (n, 1024)."""

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
        ]))
        n = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(num_layers, n, bn_size, growth_rate))
            n += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(n, n // 2))
                n //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.classifier = nn.Linear(n, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map after its ReLU (n, 1024, h, w); ``forward`` is its spatial mean."""
        return F.relu(self.features(x), inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_maps(x), 1), 1)

    def blocks(self) -> list[nn.Module]:
        return [m for m in self.features.children() if any(True for _ in m.parameters())]


# torchvision's DenseNet checkpoints predate module names without dots ("norm.1" for "norm1").
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite from ``efficientnet-lite-pytorch``; ``forward`` -> pooled features of its last conv (n, 1280)."""

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int = 224):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name(variant, image_size=image_size)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolution's output (n, 1280, h, w); ``forward`` is its spatial mean."""
        return self.net.extract_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net._avg_pooling(self.feature_maps(x)), 1)

    def blocks(self) -> list[nn.Module]:
        """Stem, the MBConv blocks, head convolution (the ImageNet classifier ``_fc`` is not used)."""
        n = self.net
        return [n._conv_stem, n._bn0, *n._blocks, n._conv_head, n._bn1]

    def conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """(module, convolution, the BatchNorm that takes its output) for ``fold_batchnorm``."""
        n = self.net
        pairs = [(n, "_conv_stem", "_bn0"), (n, "_conv_head", "_bn1")]
        for block in n._blocks:
            if hasattr(block, "_expand_conv"):
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        return pairs

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Take the package's own checkpoint (keys without the ``net.`` prefix) as well as ours."""
        if not any(k.startswith("net.") for k in state_dict):
            state_dict = {f"net.{k}": v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class TinyNet(nn.Module):
    """A very small CNN with the same interface, for fast tests (never for real features)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, dim, 3, stride=2)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_maps(x), 1), 1)


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "resnet50": lambda size: ResNet((3, 4, 6, 3)),
    "densenet121": lambda size: DenseNet(32, (6, 12, 24, 16), 64),
    "efficientnet_lite0": lambda size: EfficientNetLite("efficientnet-lite0", size),
    "tiny": lambda size: TinyNet(16),
}
# Parameters that only the ImageNet classifier uses: a features-only checkpoint may lack them.
HEAD_KEYS = re.compile(r"^(fc|classifier|net\._fc)\.(weight|bias)$")


def build(architecture: str, input_size: int) -> nn.Module:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown torch architecture {architecture!r}; available: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](input_size)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """For inference only (the model in eval mode): each BatchNorm that directly follows a convolution folded into
    that convolution's weights and bias, in place. The same function in fewer operations: features equal to
    float32 rounding, EfficientNet-Lite0 22 % faster on this CPU (docs/engines.md). Architectures without
    ``conv_bn_pairs`` (DenseNet's BatchNorms come before its convolutions) are left as they are."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = getattr(model, "conv_bn_pairs", None)
    if pairs is None:
        return model
    if model.training:
        raise ValueError("fold_batchnorm is for inference: call model.eval() first")
    for parent, conv_name, bn_name in pairs():
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
    return model


def clean_state_dict(state: Any) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under the architecture's names: unwraps {"state_dict": ...} / {"model": ...},
    drops DataParallel's ``module.`` prefix and renames torchvision's old DenseNet keys."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the file does not hold a state dict (a mapping of parameter names to tensors)")
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        key = _DENSENET_OLD_KEY.sub(r"\1\2", key)
        out[key] = value
    return out


def load_weights(model: nn.Module, state: Any) -> None:
    """Load a checkpoint strictly, except for the ImageNet classifier, which a features-only file may leave out."""
    result = model.load_state_dict(clean_state_dict(state), strict=False)
    missing = [k for k in result.missing_keys if not HEAD_KEYS.match(k)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the state dict does not fit: {len(missing)} missing parameters (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
