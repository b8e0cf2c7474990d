"""CIFAR VGGs with BatchNorm (mdistiller's ``vgg8 vgg11 vgg13 vgg16 vgg19``).

Five conv groups ``block0..block4`` (3x3 conv with bias + BN + ReLU, the group's last
ReLU left out of the ``Sequential``), max pools ``pool0..pool3`` between them, global
average pooling (``pool4``) and a linear ``classifier`` (512 -> classes). State-dict keys
and shapes are mdistiller's, so its checkpoints load with ``strict=True``.

Staging, as in mdistiller:

* the stem is ``block0`` + ReLU (``feats[0]`` and ``preact_feats[0]`` are both the
  post-ReLU output);
* block ``i`` (0-based) is ``pool{i}`` -> ``block{i+1}`` -> ReLU; ``preact_feats`` holds
  the output before that ReLU;
* ``pool3`` runs only for 64x64 inputs (mdistiller tests the input height). Stage-wise,
  that is decided from the incoming tensor: it runs when the ``block3`` output is 8
  pixels high, i.e. input height / 8 == 8. For 32x32 inputs stages 3 and 4 are both 4x4.
"""

from __future__ import annotations

from typing import List, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import register_model
from ..staged import StagedModel
from .resnet import check_num_classes, init_weights

#: Output channels of every conv, per group (mdistiller's ``cfg`` "S", "A", "B", "D", "E").
VGG_CFGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def init_mdistiller_linear(model: nn.Module) -> None:
    """He-normal (fan-out) convs with zero bias, BN 1/0, Linear N(0, 0.01) with zero bias.

    The initialisation of mdistiller's VGG and MobileNetV2.
    """
    init_weights(model)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _conv_group(cin: int, widths: Sequence[int]) -> nn.Sequential:
    """conv3x3(bias) + BN + ReLU per width, without the final ReLU (keys ``0, 1, 3, 4, ...``)."""
    layers: List[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(StagedModel):
    """CIFAR VGG with BN.

    Args:
        cfg: five lists of conv widths (see :data:`VGG_CFGS`); the last must end in 512.
        num_classes: classifier outputs.
    """

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100):
        super().__init__()
        check_num_classes(num_classes)
        cin = 3
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _conv_group(cin, widths))
            cin = widths[-1]
        for i in range(4):
            self.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)
        self.num_blocks = 4
        self.num_features = 512
        reductions = [1, 2, 4, 8, 8]
        self.feature_info = [
            dict(num_chs=cfg[i][-1], reduction=reductions[i], module=f"block{i}") for i in range(5)
        ]
        init_mdistiller_linear(self)

    def forward_stem(self, x: Tensor):
        out = F.relu(self.block0(x))
        return out, out  # mdistiller reports the post-ReLU stem output in both lists

    def forward_block(self, i: int, h: Tensor):
        self.check_block_index(i)
        if i < 3 or h.shape[-2] == 8:  # pool3 only for 64x64 inputs, as upstream
            h = getattr(self, f"pool{i}")(h)
        pre = getattr(self, f"block{i + 1}")(h)
        return F.relu(pre), pre

    def forward_head(self, h: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.pool4(h).flatten(1)
        return pooled if pre_logits else self.classifier(pooled)

    def get_classifier(self) -> nn.Module:
        return self.classifier


def _vgg(depth: int, num_classes: int) -> VGG:
    """Build the VGG of ``depth`` (8, 11, 13, 16 or 19) from :data:`VGG_CFGS`."""
    return VGG(VGG_CFGS[depth], num_classes=num_classes)


@register_model("vgg8")
def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 with BN (one conv per group)."""
    return _vgg(8, num_classes)


@register_model("vgg11")
def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11 with BN (1/1/2/2/2 convs per group)."""
    return _vgg(11, num_classes)


@register_model("vgg13")
def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 with BN (2 convs per group)."""
    return _vgg(13, num_classes)


@register_model("vgg16")
def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16 with BN (2/2/3/3/3 convs per group)."""
    return _vgg(16, num_classes)


@register_model("vgg19")
def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19 with BN (2/2/4/4/4 convs per group)."""
    return _vgg(19, num_classes)
