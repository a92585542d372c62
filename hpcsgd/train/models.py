"""Model zoo: an MLP, a LeNet-style CNN and the CIFAR ResNets of He et al. (2016).

All builders are pure functions of their arguments and of torch's global RNG state:
``torch.manual_seed(s); build_model(...)`` always gives the same parameters. Importing this
module has no side effects (nothing is seeded). Every parameter and buffer is float32.

``input_shape`` is ``(C, H, W)`` for images (digits ``(1, 8, 8)``, MNIST ``(1, 28, 28)``,
CIFAR ``(3, 32, 32)``) or ``(F,)`` for flat feature vectors. The MLP accepts any shape (it
flattens); the CNNs need a 3-dimensional image shape.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hpcsgd.errors import ConfigError

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "count_parameters",
    "mlp_hidden_for_params",
    "mlp_param_count",
    "MLP",
    "LeNet",
    "CifarResNet",
]

MODEL_NAMES = ("mlp", "lenet", "resnet20", "resnet56", "resnet110")

_RESNET_DEPTHS = {"resnet20": 20, "resnet56": 56, "resnet110": 110}

# LeNet needs two 2x2 max-pools to leave at least a 1x1 map.
_LENET_MIN_HW = 4


# --------------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_positive_int(name: str, value: object) -> int:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return int(value)


def _check_input_shape(input_shape: object) -> tuple[int, ...]:
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) == 0:
        raise ConfigError(
            "input_shape must be a non-empty tuple of positive integers: (C, H, W) for images "
            f"or (F,) for flat features, got {input_shape!r}"
        )
    if not all(_is_int(d) and d >= 1 for d in input_shape):
        raise ConfigError(
            f"input_shape must contain only positive integers, got {tuple(input_shape)!r}"
        )
    return tuple(int(d) for d in input_shape)


def _check_image_shape(model: str, input_shape: tuple[int, ...], min_hw: int) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(
            f"input_shape for model {model!r} must be an image shape (C, H, W) with "
            f"H, W >= {min_hw}, got {input_shape!r}"
        )
    c, h, w = input_shape
    if h < min_hw or w < min_hw:
        raise ConfigError(
            f"input_shape for model {model!r} must have H, W >= {min_hw}, got {input_shape!r}"
        )
    return c, h, w


def _check_hidden(mlp_hidden: object) -> tuple[int, ...]:
    if not isinstance(mlp_hidden, (tuple, list)) or not all(
        _is_int(w) and w >= 1 for w in mlp_hidden
    ):
        raise ConfigError(
            f"mlp_hidden must be a tuple of positive integer widths (may be empty), got {mlp_hidden!r}"
        )
    return tuple(int(w) for w in mlp_hidden)


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Flatten, then ``Linear + ReLU`` for each hidden width, then ``Linear`` to the classes."""

    def __init__(self, input_dim: int, num_classes: int, hidden: Sequence[int] = (256, 128)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = input_dim
        for width in hidden:
            layers.append(nn.Linear(prev, width))
            layers.append(nn.ReLU(inplace=True))
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp_param_count(input_dim: int, num_classes: int, hidden: Sequence[int]) -> int:
    """Exact parameter count of :class:`MLP` (weights and biases) without building it."""
    total = 0
    prev = input_dim
    for width in list(hidden) + [num_classes]:
        total += prev * width + width
        prev = width
    return total


def mlp_hidden_for_params(
    input_dim: int, num_classes: int, target_params: int, layers: int = 2
) -> tuple[int, ...]:
    """Equal hidden widths ``(w,) * layers`` so that the MLP has about ``target_params`` parameters.

    Solves ``(layers-1)*w^2 + (input_dim + layers + num_classes)*w + num_classes = target`` for
    ``w`` and returns whichever of the two neighbouring integers comes closer to the target.
    """
    input_dim = _check_positive_int("input_dim", input_dim)
    num_classes = _check_positive_int("num_classes", num_classes)
    layers = _check_positive_int("layers", layers)
    if not _is_int(target_params) and not isinstance(target_params, float):
        raise ConfigError(f"target_params must be a positive number, got {target_params!r}")
    minimum = mlp_param_count(input_dim, num_classes, (1,) * layers)
    if not math.isfinite(target_params) or target_params < minimum:
        raise ConfigError(
            f"target_params must be >= {minimum} (the size of an MLP with width-1 hidden layers "
            f"for input_dim={input_dim}, num_classes={num_classes}, layers={layers}), "
            f"got {target_params!r}"
        )
    a = layers - 1
    b = input_dim + layers + num_classes
    c = num_classes - target_params
    if a == 0:
        w_real = -c / b
    else:
        w_real = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    candidates = {max(1, math.floor(w_real)), max(1, math.ceil(w_real))}
    best = min(
        sorted(candidates),
        key=lambda w: abs(mlp_param_count(input_dim, num_classes, (w,) * layers) - target_params),
    )
    return (best,) * layers


# --------------------------------------------------------------------------------------------
# LeNet
# --------------------------------------------------------------------------------------------


class LeNet(nn.Module):
    """LeNet-5 style CNN with 'same' padding so it also fits 8x8 digits.

    conv(C,6,5,pad=2)-ReLU-maxpool2 - conv(6,16,5,pad=2)-ReLU-maxpool2 - FC120 - FC84 - FC classes.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        flat = 16 * ((height // 2) // 2) * ((width // 2) // 2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, section 4.2)
# --------------------------------------------------------------------------------------------


class _ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero-padding of the new channels (no params)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra > 0:
            lo = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))
        return x


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: 3x3 conv(16), 3 stages of n basic blocks (16/32/64 channels,
    stride 1/2/2), global average pooling, Linear to classes. Option-A shortcuts."""

    def __init__(self, depth: int, in_channels: int, num_classes: int):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(f"ResNet depth must be 6n+2 with n >= 1 (20, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    mlp_hidden: tuple[int, ...] = (256, 128),
) -> nn.Module:
    """Build model ``name`` (one of :data:`MODEL_NAMES`) for ``input_shape`` and ``num_classes``.

    Initialisation draws only from torch's global RNG, so it is reproducible under
    ``torch.manual_seed``. The returned model is float32 and in training mode.
    """
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ConfigError(f"model name must be one of {', '.join(MODEL_NAMES)}; got {name!r}")
    shape = _check_input_shape(input_shape)
    num_classes = _check_positive_int("num_classes", num_classes)

    model: nn.Module
    if name == "mlp":
        hidden = _check_hidden(mlp_hidden)
        model = MLP(math.prod(shape), num_classes, hidden)
    elif name == "lenet":
        c, h, w = _check_image_shape(name, shape, _LENET_MIN_HW)
        model = LeNet(c, h, w, num_classes)
    else:
        c, _, _ = _check_image_shape(name, shape, 1)
        model = CifarResNet(_RESNET_DEPTHS[name], c, num_classes)
    return model.to(torch.float32)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in ``model`` (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
