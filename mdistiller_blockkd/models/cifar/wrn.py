"""Wide residual networks for CIFAR (mdistiller's ``wrn_16_1 wrn_16_2 wrn_40_1 wrn_40_2``).

WRN-d-k: a 3x3 conv stem to 16 channels, three stages ``block1..block3`` of
``(d - 4) / 6`` pre-activation blocks (16k / 32k / 64k channels, strides 1/2/2), then
``bn1`` + ReLU, global average pooling and ``fc``. State-dict keys and shapes are
mdistiller's (``block2.layer.0.convShortcut.weight``, ...).

Staging and features, as in mdistiller:

* the stem is ``conv1`` alone; stage ``i``'s output is its raw residual sum (blocks are
  pre-activation, so nothing follows the addition); the head applies ``bn1`` + ReLU,
  pooling and ``fc``;
* ``preact_feats[i]`` (``i >= 1``) is stage ``i``'s output passed through the BatchNorm
  that pre-activates it next (the first block's ``bn1`` of the next stage, or the head's
  ``bn1`` for the last stage), i.e. the tensor just before the ReLU that follows.

Upstream evaluates those BatchNorms a second time as modules, which in training mode
updates their running statistics twice per step. Here they are evaluated functionally
with the module's parameters and the same normalisation (batch statistics in training,
running statistics in eval) but without touching the running statistics, so features
are identical and the statistics are updated once, by the layer that owns them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...registry import register_model
from ..staged import StagedModel
from .resnet import check_num_classes, init_weights


def bn_without_update(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(x)`` with the module's current normalisation mode, leaving its running stats untouched."""
    use_batch_stats = bn.training or bn.running_mean is None
    return F.batch_norm(
        x,
        None if use_batch_stats else bn.running_mean,
        None if use_batch_stats else bn.running_var,
        bn.weight,
        bn.bias,
        use_batch_stats,
        0.0,
        bn.eps,
    )


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``.

    When channels or stride change, the shortcut is a 1x1 conv (``convShortcut``, no
    BN) applied to the pre-activated input ``relu(bn1(x))``.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """One WRN stage: ``layer`` is a Sequential of :class:`WideBasicBlock` (keys ``layer.<j>.*``)."""

    def __init__(self, depth: int, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1, drop_rate) for j in range(depth)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(StagedModel):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs (see the module docstring)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0):
        super().__init__()
        check_num_classes(num_classes)
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ConfigError(f"WRN widen_factor must be a positive integer, got {widen_factor!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"WRN drop_rate must be in [0, 1), got {drop_rate!r}")
        n = (depth - 4) // 6
        chs = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, chs[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, chs[0], chs[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, chs[1], chs[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, chs[2], chs[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(chs[3])
        self.fc = nn.Linear(chs[3], num_classes)
        self.num_blocks = 3
        self.num_features = chs[3]
        self.feature_info = [dict(num_chs=chs[0], reduction=1, module="conv1")] + [
            dict(num_chs=c, reduction=r, module=f"block{i + 1}") for i, (c, r) in enumerate(zip(chs[1:], (1, 2, 4)))
        ]
        init_weights(self, zero_linear_bias=True)

    def _stages(self):
        return (self.block1, self.block2, self.block3)

    def forward_stem(self, x: Tensor):
        out = self.conv1(x)
        return out, out

    def forward_block(self, i: int, h: Tensor):
        self.check_block_index(i)
        stages = self._stages()
        out = stages[i](h)
        next_bn = stages[i + 1].layer[0].bn1 if i + 1 < self.num_blocks else self.bn1
        return out, bn_without_update(next_bn, out)

    def forward_head(self, h: Tensor, pre_logits: bool = False) -> Tensor:
        return super().forward_head(F.relu(self.bn1(h)), pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.fc


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-16-1 (2 blocks per stage, 16/32/64 channels)."""
    return WideResNet(16, 1, num_classes, drop_rate)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-16-2 (2 blocks per stage, 32/64/128 channels)."""
    return WideResNet(16, 2, num_classes, drop_rate)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-1 (6 blocks per stage, 16/32/64 channels)."""
    return WideResNet(40, 1, num_classes, drop_rate)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-2 (6 blocks per stage, 32/64/128 channels)."""
    return WideResNet(40, 2, num_classes, drop_rate)
