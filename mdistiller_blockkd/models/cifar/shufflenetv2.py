"""CIFAR ShuffleNetV2 of mdistiller (``ShuffleV2``: net size 1, 116/232/464 channels).

A 1x1 conv + BN + ReLU stem to 24 channels (``conv1``/``bn1``), three stages
``layer1..layer3`` (a stride-2 :class:`DownBlock` then 3/7/3 :class:`SplitBlock` s), a
1x1 conv + BN + ReLU to 1024 channels (``conv2``/``bn2``), global average pooling and
``linear``. State-dict keys and shapes are mdistiller's; the default PyTorch
initialisation is kept, as upstream.

Features, as in mdistiller: ``feats[0]`` (and ``preact_feats[0]``) is the post-ReLU stem
output; ``feats[i]`` is stage ``i``'s output and ``preact_feats[i]`` its last block's
``cat(x1, bn3(...))`` before the ReLU *and before the channel shuffle* (upstream's
choice: its channels are in unshuffled order). The head (``conv2``, pooling, ``linear``)
follows the last stage. Upstream pools with ``avg_pool2d(out, 4)``, the global average of
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
from .shufflenetv1 import channel_shuffle


class SplitBlock(nn.Module):
    """Basic ShuffleNetV2 unit: split channels in half, transform the second half, concat, shuffle.

    ``forward`` returns ``(out, pre)``: ``pre = cat(x1, bn3(conv3(...)))`` (no ReLU, no shuffle).
    """

    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        c = int(channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor):
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        y = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))))
        out = channel_shuffle(torch.cat([x1, F.relu(y)], 1), 2)
        return out, torch.cat([x1, y], 1)


class DownBlock(nn.Module):
    """Stride-2 ShuffleNetV2 unit: two branches on the whole input, each to half the output channels.

    Left: 3x3 depthwise (s2) + BN, 1x1 + BN + ReLU (``conv1/bn1, conv2/bn2``). Right: 1x1 +
    BN + ReLU, 3x3 depthwise (s2) + BN, 1x1 + BN + ReLU (``conv3..conv5``). Concat, shuffle.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(CifarStagedNet):
    """CIFAR ShuffleNetV2.

    Args:
        out_channels: channels of the three stages, then of the final 1x1 conv.
        depths: basic units per stage (after the stage's down-sampling unit).
        num_classes: classifier outputs.
    """

    def __init__(self, out_channels: Sequence[int], depths: Sequence[int], num_classes: int = 100):
        super().__init__()
        check_num_classes(num_classes)
        if len(out_channels) != len(depths) + 1 or min(depths) < 1:
            raise ConfigError(
                f"ShuffleNetV2 needs one depth >= 1 per stage and one more width for the final conv, "
                f"got out_channels={list(out_channels)}, depths={list(depths)}"
            )
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        self.feature_info = [dict(num_chs=24, reduction=1, module="bn1")]
        for i, (cout, depth) in enumerate(zip(out_channels, depths)):
            units = [DownBlock(cin, cout)] + [SplitBlock(cout) for _ in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
            self.feature_info.append(dict(num_chs=cout, reduction=2 ** (i + 1), module=f"layer{i + 1}"))
            cin = cout
        self.conv2 = nn.Conv2d(cin, out_channels[-1], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[-1])
        self.linear = nn.Linear(out_channels[-1], num_classes)
        self.num_blocks = len(depths)
        self.num_features = out_channels[-1]

    def forward_block(self, i: int, h: Tensor):
        self.check_block_index(i)
        layer = getattr(self, f"layer{i + 1}")
        return self.run_preact_blocks(layer[1:], layer[0](h))  # the down-sampling unit has no preact

    def forward_head(self, h: Tensor, pre_logits: bool = False) -> Tensor:
        return super().forward_head(F.relu(self.bn2(self.conv2(h))), pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.linear


@register_model("ShuffleV2")
def shufflev2(num_classes: int = 100) -> ShuffleNetV2:
    """mdistiller's ``ShuffleV2`` (net size 1): 116/232/464 channels, 3/7/3 units, 1024-d head."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes)
