"""CIFAR variants of ResNet18 / ResNet50 (mdistiller's ``resnetv2``).

A 3x3 stride-1 stem (64 channels, conv1/bn1/ReLU, no max-pool), four stages
``layer1..layer4`` of 64/128/256/512 planes with strides 1/2/2/2, global average pooling
and a classifier named ``linear``. Projection shortcuts are called ``shortcut``. Built on
:class:`~.resnet.CifarResNet`, so ``feature_info`` (hence ``stage_channels()``) lists the
real widths: ``[64, 64, 128, 256, 512]`` for ResNet18, ``[64, 256, 512, 1024, 2048]``
for ResNet50.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import register_model
from .resnet import BasicBlock, CifarResNet, ResidualBlock

_WIDTHS = (64, 128, 256, 512)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), each followed by BN."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, proj_name: str = "shortcut"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self._make_proj(cin, planes, stride, proj_name)

    def branch(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


def _resnetv2(block, depths, num_classes: int) -> CifarResNet:
    return CifarResNet(
        block, depths, _WIDTHS, 64, num_classes=num_classes, proj_name="shortcut", head_name="linear"
    )


@register_model("ResNet18")
def ResNet18(num_classes: int = 100) -> CifarResNet:
    """ResNet-18 for 32x32 inputs (BasicBlock, 2-2-2-2)."""
    return _resnetv2(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model("ResNet50")
def ResNet50(num_classes: int = 100) -> CifarResNet:
    """ResNet-50 for 32x32 inputs (Bottleneck, 3-4-6-3)."""
    return _resnetv2(Bottleneck, (3, 4, 6, 3), num_classes)
