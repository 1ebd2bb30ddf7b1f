"""The three benchmark models, with a width/depth knob so smoke runs stay tiny.

* :func:`resnet32`: CIFAR ResNet of He et al. (2016, section 4.2): a 3x3 conv with 16 channels, three
  stages of ``n = 5`` basic blocks (two 3x3 conv + BN each) at 16/32/64 channels, global average pooling,
  a 10-way linear layer; 6n + 2 = 32 layers with weights. Shortcuts are **option A** (identity; when the
  shape changes, stride-2 subsampling and zero-padding of the new channels), so there are no 1x1
  convolutions: every conv is a 3x3 (b = 9 mini-blocks). 0.46 M parameters.
* :func:`vgg16`: the usual CIFAR VGG-16 with batch norm (13 3x3 convs, 64-64-M-128-128-M-256x3-M-512x3-M-
  512x3-M, each conv followed by BN and ReLU) and a 512-512-10 classifier (ReLU, no dropout). 15 M params.
* :func:`deep_autoencoder`: the MNIST autoencoder of Hinton & Salakhutdinov (2006),
  784-1000-500-250-30-250-500-1000-784, logistic (sigmoid) hidden units, a linear 30-unit code layer and
  logistic outputs; the model returns logits (pair it with ``binary_cross_entropy_with_logits``). 2.8 M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as tnf
from torch import nn

__all__ = ["resnet32", "vgg16", "deep_autoencoder", "VGG16_CFG", "AUTOENCODER_WIDTHS"]

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
AUTOENCODER_WIDTHS = (784, 1000, 500, 250, 30)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.extra = c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: identity, or subsample by the stride and zero-pad the extra channels."""
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = tnf.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tnf.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return tnf.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int = 5, widths: tuple[int, int, int] = (16, 32, 64),
                 num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(blocks_per_stage):
                layers.append(_BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(tnf.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(tnf.adaptive_avg_pool2d(x, 1), 1))


def resnet32(width_div: int = 1, blocks_per_stage: int = 5) -> nn.Module:
    """ResNet-32 for 32x32 CIFAR images (``width_div``/``blocks_per_stage`` shrink it for smoke runs)."""
    widths = tuple(max(2, w // width_div) for w in (16, 32, 64))
    return CifarResNet(blocks_per_stage, widths)  # type: ignore[arg-type]


def vgg16(width_div: int = 1, num_classes: int = 10) -> nn.Module:
    """VGG-16 with batch norm for 32x32 CIFAR images; classifier 512-512-``num_classes``."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            c_out = max(2, int(v) // width_div)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
    hidden = max(2, 512 // width_div)
    return nn.Sequential(
        *layers, nn.Flatten(),
        nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def deep_autoencoder(widths: tuple[int, ...] = AUTOENCODER_WIDTHS) -> nn.Module:
    """Mirrored sigmoid MLP with a linear code layer (Hinton & Salakhutdinov 2006); returns logits."""
    dims = list(widths) + list(reversed(widths[:-1]))
    layers: list[nn.Module] = []
    code = len(widths) - 2  # index of the Linear that produces the code
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i != code and i != len(dims) - 2:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)
