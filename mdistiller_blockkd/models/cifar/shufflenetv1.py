"""CIFAR ShuffleNetV1 of mdistiller (``ShuffleV1``: groups 3, stages of 240/480/960 channels).

A 1x1 conv + BN + ReLU stem to 24 channels (``conv1``/``bn1``), three stages
``layer1..layer3`` of 4/8/4 :class:`ShuffleBottleneck` s, global average pooling and
``linear``. Each stage's first block has stride 2 and concatenates its branch with an
average-pooled shortcut; the others add an identity shortcut. State-dict keys and shapes
are mdistiller's; the default PyTorch initialisation is kept, as upstream.

Features, as in mdistiller: ``feats[0]`` (and ``preact_feats[0]``) is the post-ReLU stem
output; ``preact_feats[i]`` is stage ``i``'s output before its last ReLU (the concat or
sum of its last block). Upstream pools with ``avg_pool2d(out, 4)``, the global average of
the 4x4 map of a 32x32 input; here pooling is global for every input size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...registry import register_model
from .resnet import CifarStagedNet, check_num_classes


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` equal groups: ``(g, C/g) -> (C/g, g)``."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBottleneck(nn.Module):
    """ShuffleNetV1 unit: grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1, + shortcut.

    ``forward`` returns ``(relu(pre), pre)``; ``pre`` is ``cat(branch, avgpool(x))`` for
    stride 2, else ``branch + x``. The first 1x1 conv is ungrouped on the 24-channel stem.
    """

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = cout // 4
        self.g1 = 1 if cin == 24 else groups
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            pre = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            pre = out + x
        return F.relu(pre), pre


class ShuffleNetV1(CifarStagedNet):
    """CIFAR ShuffleNetV1.

    Args:
        out_planes: output channels of each stage (each divisible by 4 * ``groups``).
        depths: blocks per stage.
        groups: groups of the 1x1 convs.
        num_classes: classifier outputs.
    """

    def __init__(self, out_planes: Sequence[int], depths: Sequence[int], groups: int, num_classes: int = 100):
        super().__init__()
        check_num_classes(num_classes)
        if len(out_planes) != len(depths) or min(depths) < 1:
            raise ConfigError(f"ShuffleNetV1 needs one depth >= 1 per stage, got {list(depths)} for {list(out_planes)}")
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        self.feature_info = [dict(num_chs=24, reduction=1, module="bn1")]
        for i, (cout, depth) in enumerate(zip(out_planes, depths)):
            blocks = []
            for j in range(depth):
                # the stride-2 first block concatenates its input, so its branch makes the rest
                blocks.append(ShuffleBottleneck(cin, cout - cin if j == 0 else cout, 2 if j == 0 else 1, groups))
                cin = cout
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=cout, reduction=2 ** (i + 1), module=f"layer{i + 1}"))
        self.linear = nn.Linear(cin, num_classes)
        self.num_blocks = len(depths)
        self.num_features = cin

    def get_classifier(self) -> nn.Module:
        return self.linear


@register_model("ShuffleV1")
def shufflev1(num_classes: int = 100) -> ShuffleNetV1:
    """mdistiller's ``ShuffleV1``: groups 3, 240/480/960 channels, 4/8/4 blocks."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)
