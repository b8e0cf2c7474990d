"""CIFAR MobileNetV2 of mdistiller (``MobileNetV2`` = ``mobile_half``: expansion 6, width 0.5).

A stride-2 3x3 conv + BN + ReLU stem (``conv1``), seven groups ``blocks.0..blocks.6`` of
inverted residuals (1x1 expand + BN + ReLU, 3x3 depthwise + BN + ReLU, 1x1 linear
projection + BN; identity shortcut when stride is 1 and channels match), a 1x1 conv +
BN + ReLU to 1280 channels (``conv2``), global average pooling and ``classifier.0``.
State-dict keys and shapes are mdistiller's.

Staging, as in mdistiller's features: stem = ``conv1``; the four stages are
``blocks.0-1``, ``blocks.2``, ``blocks.3-4`` and ``blocks.5-6``; the head is ``conv2``,
pooling and the classifier. Stage outputs end in a linear BN (no ReLU), so
``preact_feats`` equal ``feats`` (upstream returns no ``preact_feats`` for this model).
The stem output is post-ReLU in both lists.

Upstream pools with ``AvgPool2d(input_size // 16, ceil_mode=True)``, a global average
over the final map for the input size it was built for; here the pooling is global for
every input size (identical for 32x32 inputs).
"""

from __future__ import annotations

from torch import Tensor, nn

from ...errors import ConfigError
from ...registry import register_model
from ..staged import StagedModel
from .resnet import check_num_classes
from .vgg import init_mdistiller_linear

#: ``(expansion, channels, repeats, first stride)`` per group (width 1.0; expansion None = T).
MBV2_SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
                (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
#: Which groups form each stage (mdistiller's f1..f4 are taken after groups 1, 2, 4, 6).
MBV2_STAGES = ((0, 1), (2,), (3, 4), (5, 6))


def conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU (keys ``0.weight``, ``1.*``)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand (1x1), depthwise (3x3, ``stride``), project (1x1, linear)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(StagedModel):
    """CIFAR MobileNetV2.

    Args:
        T: expansion ratio of every group but the first.
        width_mult: channel multiplier.
        num_classes: classifier outputs.
    """

    def __init__(self, T: int = 6, width_mult: float = 0.5, num_classes: int = 100):
        super().__init__()
        check_num_classes(num_classes)
        if T < 1 or width_mult <= 0:
            raise ConfigError(f"MobileNetV2 needs T >= 1 and width_mult > 0, got T={T}, width_mult={width_mult}")
        cin = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, cin, 3, stride=2)
        groups, reductions, reduction = [], [], 2
        for t, c, n, s in MBV2_SETTING:
            cout = int(c * width_mult)
            layers = []
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, s if j == 0 else 1, T if t is None else t))
                cin = cout
            groups.append(nn.Sequential(*layers))
            reduction *= s
            reductions.append(reduction)
        self.blocks = nn.ModuleList(groups)
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(cin, self.last_channel, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.num_blocks = len(MBV2_STAGES)
        self.num_features = self.last_channel
        self.feature_info = [dict(num_chs=int(32 * width_mult), reduction=2, module="conv1")] + [
            dict(num_chs=int(MBV2_SETTING[st[-1]][1] * width_mult), reduction=reductions[st[-1]],
                 module=f"blocks.{st[-1]}")
            for st in MBV2_STAGES
        ]
        init_mdistiller_linear(self)

    def forward_stem(self, x: Tensor):
        out = self.conv1(x)
        return out, out

    def forward_block(self, i: int, h: Tensor):
        self.check_block_index(i)
        for g in MBV2_STAGES[i]:
            h = self.blocks[g](h)
        return h, h  # stages end in a linear BN: no ReLU to precede

    def forward_head(self, h: Tensor, pre_logits: bool = False) -> Tensor:
        return super().forward_head(self.conv2(h), pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.classifier


@register_model("MobileNetV2")
def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """mdistiller's ``MobileNetV2`` (``mobile_half``): expansion 6, width 0.5, 1280-d pooled feature."""
    return MobileNetV2(T=6, width_mult=0.5, num_classes=num_classes)
