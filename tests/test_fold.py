"""Folding a frozen teacher's BatchNorms into its convolutions keeps every output."""

import json
import os

import pytest
import torch

from mdistiller_blockkd.models import build_model
from mdistiller_blockkd.models.fold import fold_frozen_bn

from helpers import randomize_bn

ALL = sorted(json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "cifar_models_mdistiller.json"))))
# the smallest model of every family (the folding logic sees the same module patterns in the rest)
NAMES = ["resnet8", "resnet8x4", "ResNet18", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"]


def test_families_covered():
    assert {n.rstrip("0123456789x_") for n in ALL} >= {n.rstrip("0123456789x_") for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_fold_is_exact_or_declined(name):
    torch.manual_seed(0)
    # float64 so that the comparison tests the algebra, not float32 rounding in deep nets
    model = build_model(name, num_classes=100).eval().double()
    randomize_bn(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    folded = fold_frozen_bn(model, x)
    assert folded is not None, f"{name}: no conv->BN pair was folded"
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) < sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(not p.requires_grad for p in folded.parameters())
    with torch.no_grad():
        a, fa = model(x)
        b, fb = folded(x)
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    for u, v in zip(fa["feats"], fb["feats"]):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-9)
    # the original is untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_fold_declines_when_a_conv_output_is_reused():
    from mdistiller_blockkd.models.staged import StagedModel

    class Reuse(StagedModel):
        num_blocks = 1
        feature_info = [dict(num_chs=4, reduction=1), dict(num_chs=4, reduction=1)]

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4, 2)

        def forward_stem(self, x):
            c = self.conv(x)
            return self.bn(c) + c, c  # the conv output is used twice

        def forward_block(self, i, h):
            return h, h

        def forward_head(self, h, pre_logits=False):
            p = h.mean((2, 3))
            return p if pre_logits else self.fc(p)

        def get_classifier(self):
            return self.fc

    m = Reuse().eval()
    randomize_bn(m)
    assert fold_frozen_bn(m, torch.randn(2, 3, 8, 8)) is None
