"""Folding a frozen teacher's BatchNorms into its convolutions keeps every output."""

import json
import os

import pytest
import torch

from mdistiller_blockkd.models import build_model
from mdistiller_blockkd.models import fold as fold_mod
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


# -- TF32 and the refusal message ----------------------------------------------------------
def _tf32_switches():
    """The settings deciding TF32 in convolutions and matrix products, as a comparable tuple."""
    b = torch.backends
    if hasattr(getattr(b.cudnn, "conv", None), "fp32_precision"):
        return b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision
    return b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32


def _tf32_on():
    conv, _ = _tf32_switches()
    return conv in ("tf32", True)


def test_check_runs_without_tf32_and_restores_the_settings(monkeypatch):
    """On Ampere and newer GPUs fp32 convolutions use TF32 by default (torch's default setting,
    which this CPU build reports too); its rounding (~1e-3) fails the 1e-4 check. Simulated: the
    check sees a 1e-3 difference whenever TF32 is on."""
    assert _tf32_on()  # torch's default
    before = _tf32_switches()
    real = fold_mod._difference
    monkeypatch.setattr(fold_mod, "_difference", lambda ref, outs: 1e-3 if _tf32_on() else real(ref, outs))
    m = build_model("resnet8", num_classes=10).eval()
    randomize_bn(m)
    folded, note = fold_mod.try_fold_frozen_bn(m, torch.randn(2, 3, 32, 32))
    assert folded is not None and note.endswith("conv->BN pairs folded")
    assert _tf32_switches() == before
    with pytest.raises(ZeroDivisionError):  # restored on errors too
        with fold_mod.exact_fp32():
            assert not _tf32_on()
            1 / 0
    assert _tf32_switches() == before


def test_a_refused_fold_is_said_once(monkeypatch):
    import warnings

    from mdistiller_blockkd.config import load_cfg
    from mdistiller_blockkd.distillers import distiller_dict

    monkeypatch.setattr(fold_mod, "_difference", lambda ref, outs: 0.5)
    torch.manual_seed(0)
    cfg = load_cfg(None, ["DISTILLER.TYPE", "KD"])
    d = distiller_dict["KD"](build_model("resnet8", num_classes=10), build_model("resnet20", num_classes=10), cfg)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    assert d.teacher_folded is None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        d.train()
        for _ in range(2):
            d(image=x, target=y, epoch=1)
        d.load_state_dict(d.state_dict())  # the executor is rebuilt, and refused again
        d(image=x, target=y, epoch=1)
    said = [str(w.message) for w in seen if "BatchNorm folding" in str(w.message)]
    assert len(said) == 1, said
    assert "KD: the teacher runs without BatchNorm folding (none of its" in said[0]
    assert "changed the outputs by up to 0.5 (relative; the limit is 0.0001)" in said[0]
    assert d.teacher_folded is False and d.teacher_model(x) is d.teacher
