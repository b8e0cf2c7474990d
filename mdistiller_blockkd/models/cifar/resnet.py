"""CIFAR ResNets of mdistiller (resnet8 ... resnet110, resnet8x4, resnet32x4).

Three stages of post-activation :class:`BasicBlock` s (``6n + 2`` layers), a 3x3 stem
conv + BN + ReLU, global average pooling and a linear classifier ``fc``. A block whose
input and output shapes differ projects its shortcut with a 1x1 conv + BN
(``downsample``). State-dict keys and shapes are mdistiller's, so its checkpoints load
with ``strict=True``.

This module also holds the pieces shared by the ResNet family (``resnetv2`` builds
ResNet18/ResNet50 from :class:`CifarResNet` with its own block and key names):
:func:`init_weights`, :func:`conv_bn_proj`, :class:`BasicBlock`, :class:`CifarResNet`;
and, for the ShuffleNets too, :func:`check_num_classes` and :class:`CifarStagedNet`
(``conv1 -> bn1 -> ReLU`` stem and ``layer<k>`` stages).

Features follow mdistiller: ``feats[0]`` (and ``preact_feats[0]``) is the stem output
after its ReLU; ``feats[i]`` is stage ``i``'s output, ``preact_feats[i]`` the same
before the last block's final ReLU.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...registry import register_model
from ..staged import StagedModel


def init_weights(model: nn.Module, zero_linear_bias: bool = False) -> None:
    """mdistiller's initialisation: He-normal (fan-out) convs, BN weight 1 / bias 0.

    Linear layers keep PyTorch's default init; ``zero_linear_bias`` zeroes their bias
    (the WRN recipe).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and zero_linear_bias and m.bias is not None:
            nn.init.zeros_(m.bias)


def conv_bn_proj(cin: int, cout: int, stride: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN: the projection shortcut (keys ``0.weight``, ``1.*``)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


def check_num_classes(num_classes) -> int:
    """Return ``num_classes`` if it is a positive int, else raise a :class:`ConfigError`."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


class ResidualBlock(nn.Module):
    """Post-activation residual block base: ``relu(branch(x) + shortcut(x))``.

    ``forward`` returns ``(out, preact)``, ``preact`` being the sum before the ReLU.
    Subclasses build the branch in ``__init__`` and implement :meth:`branch`. The
    projection shortcut (present when the shape changes) is stored under the attribute
    name ``proj_name`` (``downsample`` in mdistiller's ResNet, ``shortcut`` in ResNetV2).
    """

    expansion = 1

    def _make_proj(self, cin: int, planes: int, stride: int, proj_name: str) -> None:
        cout = planes * self.expansion
        self._proj_name = proj_name
        proj = conv_bn_proj(cin, cout, stride) if stride != 1 or cin != cout else None
        setattr(self, proj_name, proj)

    def branch(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor):
        proj = getattr(self, self._proj_name)
        pre = self.branch(x) + (x if proj is None else proj(x))
        return F.relu(pre), pre


class BasicBlock(ResidualBlock):
    """Two 3x3 conv + BN layers (keys ``conv1 bn1 conv2 bn2`` + projection)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, proj_name: str = "downsample"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self._make_proj(cin, planes, stride, proj_name)

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class CifarStagedNet(StagedModel):
    """A CIFAR net of mdistiller's layout: stem ``conv1 -> bn1 -> ReLU``, then stages
    ``layer1 .. layerK``, each a Sequential of blocks returning ``(out, preact)``.

    The subclass creates ``conv1``, ``bn1`` and the ``layer<k>`` modules; the head is
    :class:`StagedModel`'s default (global average pooling + ``get_classifier()``).
    """

    def forward_stem(self, x: Tensor):
        out = F.relu(self.bn1(self.conv1(x)))
        return out, out  # mdistiller reports the post-ReLU stem output in both lists

    def forward_block(self, i: int, h: Tensor):
        self.check_block_index(i)
        return self.run_preact_blocks(getattr(self, f"layer{i + 1}"), h)


class CifarResNet(CifarStagedNet):
    """Generic CIFAR ResNet: 3x3 stem (conv1/bn1/ReLU), stages ``layer1..layerK``, head.

    Args:
        block: residual block class (``block(cin, planes, stride, proj_name)``).
        depths: number of blocks per stage.
        widths: ``planes`` per stage (output channels are ``planes * block.expansion``).
        stem_width: stem output channels.
        num_classes: classifier outputs.
        strides: first-block stride per stage (default ``1, 2, 2, ...``).
        proj_name: attribute name of the projection shortcut inside a block.
        head_name: attribute name of the classifier (``fc`` or ``linear``).

    Each stage is one staged block; the head is global average pooling + classifier.
    """

    def __init__(
        self,
        block,
        depths: Sequence[int],
        widths: Sequence[int],
        stem_width: int,
        num_classes: int = 100,
        strides: Optional[Sequence[int]] = None,
        proj_name: str = "downsample",
        head_name: str = "fc",
    ):
        super().__init__()
        check_num_classes(num_classes)
        strides = tuple(strides) if strides is not None else (1,) + (2,) * (len(depths) - 1)
        if not (len(depths) == len(widths) == len(strides)) or min(depths) < 1:
            raise ConfigError(
                f"CifarResNet needs one depth >= 1, width and stride per stage; got depths={list(depths)}, "
                f"widths={list(widths)}, strides={list(strides)}"
            )
        self.conv1 = nn.Conv2d(3, stem_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        cin, reduction = stem_width, 1
        info = [dict(num_chs=stem_width, reduction=1, module="bn1")]
        for i, (depth, planes, stride) in enumerate(zip(depths, widths, strides)):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, planes, stride if j == 0 else 1, proj_name))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            reduction *= stride
            info.append(dict(num_chs=cin, reduction=reduction, module=f"layer{i + 1}"))
        self.num_blocks = len(depths)
        self.feature_info = info
        self.num_features = cin
        self._head_name = head_name
        self.add_module(head_name, nn.Linear(cin, num_classes))
        init_weights(self)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self._head_name)


def _cifar_resnet(depth: int, widths: Sequence[int], num_classes: int) -> CifarResNet:
    """mdistiller's ``ResNet(depth, num_filters, "basicblock")``: ``(depth - 2) / 6`` blocks per stage."""
    if (depth - 2) % 6:
        raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet(BasicBlock, [n] * 3, widths[1:], widths[0], num_classes=num_classes)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 (1 block per stage, 16/32/64 channels)."""
    return _cifar_resnet(8, _NARROW, num_classes)


@register_model("resnet14")
def resnet14(num_classes: int = 100) -> CifarResNet:
    """ResNet-14 (2 blocks per stage, 16/32/64 channels)."""
    return _cifar_resnet(14, _NARROW, num_classes)


@register_model("resnet20")
def resnet20(num_classes: int = 100) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, 16/32/64 channels)."""
    return _cifar_resnet(20, _NARROW, num_classes)


@register_model("resnet32")
def resnet32(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 (5 blocks per stage, 16/32/64 channels)."""
    return _cifar_resnet(32, _NARROW, num_classes)


@register_model("resnet44")
def resnet44(num_classes: int = 100) -> CifarResNet:
    """ResNet-44 (7 blocks per stage, 16/32/64 channels)."""
    return _cifar_resnet(44, _NARROW, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56 (9 blocks per stage, 16/32/64 channels)."""
    return _cifar_resnet(56, _NARROW, num_classes)


@register_model("resnet110")
def resnet110(num_classes: int = 100) -> CifarResNet:
    """ResNet-110 (18 blocks per stage, 16/32/64 channels)."""
    return _cifar_resnet(110, _NARROW, num_classes)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-8x4 (32-channel stem, 1 block per stage, 64/128/256 channels)."""
    return _cifar_resnet(8, _WIDE, num_classes)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-32x4 (32-channel stem, 5 blocks per stage, 64/128/256 channels)."""
    return _cifar_resnet(32, _WIDE, num_classes)
