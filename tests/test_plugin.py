"""The mdistiller plugin, against a fake minimal ``mdistiller`` package."""

import json
import os
import sys
import textwrap

import pytest
import torch
from torch import nn

from mdistiller_blockkd import plugin
from mdistiller_blockkd.errors import ConfigError
from mdistiller_blockkd.models import build_model
from mdistiller_blockkd.models.staged import StagedModel

from helpers import drop_fake_mdistiller


class Plain(nn.Module):
    """An "upstream" model: same children (hence state-dict keys) as ``impl``, but not a StagedModel."""

    def __init__(self, impl: nn.Module, scale: float = 1.0):
        super().__init__()
        for n, child in impl.named_children():
            self.add_module(n, child)
        self.__dict__["_impl"] = impl  # forward only; not registered
        self.scale = scale

    def forward(self, x):
        logits, feats = self._impl(x)
        return logits * self.scale, feats


MANIFEST = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "cifar_models_mdistiller.json")))

#: mdistiller's CIFAR-100 pairs (teacher, student) and its ImageNet ResNet pair.
CIFAR_PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
               ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"),
               ("resnet32x4", "ShuffleV2"), ("ResNet50", "MobileNetV2"), ("vgg13", "MobileNetV2"),
               ("wrn_40_2", "ShuffleV1")]
IMAGENET_PAIRS = [("ResNet34", "ResNet18")]


def test_register_adds_distiller_and_cfg_node(fake_mdistiller):
    cls = plugin.register()
    import mdistiller.distillers as up
    from mdistiller.engine.cfg import CFG

    from mdistiller_blockkd.distillers import distiller_dict
    from mdistiller_blockkd.config import CFG as OURS

    assert up.distiller_dict["BLOCKKD"] is cls and up.distiller_dict["NONE"].__module__ == "mdistiller.distillers"
    assert issubclass(cls, distiller_dict["BLOCKKD"])
    assert CFG.BLOCKKD == OURS.BLOCKKD and CFG.BLOCKKD is not OURS.BLOCKKD
    assert CFG.KD.TEMPERATURE == 4
    # idempotent, and an existing node is left alone
    CFG.BLOCKKD.T = 2.5
    assert plugin.register() is cls
    assert CFG.BLOCKKD.T == 2.5
    # a YAML with a BLOCKKD section merges into upstream's config
    CFG.merge_from_list(["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.WARMUP", 5])
    assert CFG.BLOCKKD.WARMUP == 5


def test_register_without_mdistiller_raises_import_error(monkeypatch):
    drop_fake_mdistiller()
    monkeypatch.setitem(sys.modules, "mdistiller", None)  # makes `import mdistiller` fail
    with pytest.raises(ImportError, match="mdistiller is not importable; install it from its repository, "
                                          "or use this toolbox's own tools/train.py"):
        plugin.register()


def test_main_without_script_prints_usage(capsys):
    assert plugin.main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_main_registers_then_runs_the_training_script(fake_mdistiller, tmp_path, monkeypatch):
    script = tmp_path / "tools" / "train.py"
    script.parent.mkdir()
    out = tmp_path / "ran.txt"
    script.write_text(textwrap.dedent(f"""
        import sys
        from mdistiller.distillers import distiller_dict
        from mdistiller.engine.cfg import CFG
        if __name__ == "__main__":
            CFG.merge_from_list(sys.argv[1:])
            with open({str(out)!r}, "w") as f:
                f.write(distiller_dict["BLOCKKD"].__name__ + " " + str(CFG.BLOCKKD.T))
    """))
    monkeypatch.setattr(sys, "argv", ["python"])
    assert plugin.main([str(script), "BLOCKKD.T", "3.0"]) == 0
    assert out.read_text() == "MdistillerBlockKD 3.0"


def test_registered_distiller_adapts_plain_upstream_models_and_steps(fake_mdistiller):
    cls = plugin.register()
    from mdistiller.engine.cfg import CFG

    torch.manual_seed(0)
    up_student, up_teacher = Plain(build_model("resnet8", num_classes=7)), Plain(build_model("resnet20", num_classes=7))
    assert not isinstance(up_student, StagedModel)
    s_keys = list(up_student.state_dict())
    CFG.BLOCKKD.T = 2.0  # upstream's config values reach the distiller
    d = cls(up_student, up_teacher, CFG)
    assert d.opts.loss.T == 2.0
    assert isinstance(d.student, StagedModel) and type(d.student).__name__ != "Plain"
    assert list(d.student.state_dict()) == s_keys  # upstream saves distiller.student.state_dict()
    assert d.student.get_classifier().out_features == 7
    for k, v in up_teacher.state_dict().items():
        assert torch.equal(d.teacher.state_dict()[k], v)
    d.train()
    assert d.student.training and not d.teacher.training
    opt = torch.optim.SGD(d.get_learnable_parameters(), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 6])
    logits, losses = d(image=x, target=y, epoch=1)  # mdistiller's trainer call
    loss = sum(v.mean() for v in losses.values())
    assert logits.shape == (2, 7) and torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in d.student.state_dict().items())
    d.eval()
    assert d(image=x).shape == (2, 7)  # mdistiller's validate() call


def test_staged_models_are_used_as_they_are():
    m = build_model("resnet8", num_classes=5)
    assert plugin.as_staged(m) is m
    assert plugin.as_staged(nn.DataParallel(m)) is m


def test_as_staged_copies_weights_mode_and_flags():
    src = build_model("wrn_16_1", num_classes=3)
    src.fc.weight.requires_grad_(False)
    src.eval()
    up = Plain(src)
    up.eval()
    ours = plugin.as_staged(up, "teacher")
    assert ours is not src and type(ours) is type(src)
    assert not ours.training and not ours.fc.weight.requires_grad and ours.fc.bias.requires_grad
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], up(x)[0])
    assert plugin.match_architecture(up.state_dict()) == [("wrn_16_1", 3)]


def test_torchvision_resnet_is_recognised_as_timm_resnet():
    tv = pytest.importorskip("torchvision")
    up = tv.models.resnet18(num_classes=4)
    ours = plugin.as_staged(up, "student")
    assert ours.timm_name == "resnet18" and list(ours.state_dict()) == list(up.state_dict())
    x = torch.randn(1, 3, 64, 64)
    up.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], up(x), rtol=1e-4, atol=1e-4)


def test_unknown_or_different_models_are_refused():
    with pytest.raises(ConfigError, match="matches no model of mdistiller_blockkd"):
        plugin.as_staged(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "student")
    # same keys, different function (logits scaled): refused
    with pytest.raises(ConfigError, match="computes a different function"):
        plugin.as_staged(Plain(build_model("resnet8", num_classes=5), scale=2.0), "student")


# -- every upstream pair, with the stand-in's own model classes ------------------------
def _standin_models():
    from mdistiller.models import cifar_model_dict, imagenet_model_dict

    return cifar_model_dict, imagenet_model_dict


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_standin_models_have_mdistillers_layout(fake_mdistiller, name):
    """The stand-in is faithful: state-dict keys, order, shapes, parameter count and feature shapes."""
    cifar, _ = _standin_models()
    torch.manual_seed(0)
    model = cifar[name](num_classes=100).eval()
    assert not isinstance(model, StagedModel)
    assert not type(model).__module__.startswith("mdistiller_blockkd")
    want = MANIFEST[name]
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k, list(s)) for k, s in want["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == want["params"]
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    assert [list(f.shape[1:]) for f in feats["feats"]] == want["feats"]
    assert list(feats["pooled_feat"].shape[1:]) == want["pooled_feat"]


def test_mobilenetv2_sequential_classifier_is_recognised(fake_mdistiller):
    cifar, _ = _standin_models()
    up = cifar["MobileNetV2"](num_classes=100)
    assert "classifier.0.weight" in up.state_dict() and "classifier.weight" not in up.state_dict()
    assert plugin.match_architecture(up.state_dict()) == [("MobileNetV2", 100)]
    assert plugin.match_architecture(cifar["MobileNetV2"](num_classes=10).state_dict()) == [("MobileNetV2", 10)]


def _one_step(cls, CFG, up_teacher, up_student, size, num_classes):
    d = cls(up_student, up_teacher, CFG)
    d.train()
    opt = torch.optim.SGD(d.get_learnable_parameters(), lr=0.01)
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([0, num_classes - 1])
    logits, losses = d(image=x, target=y, epoch=1)
    loss = sum(v.mean() for v in losses.values())
    assert logits.shape == (2, num_classes) and torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert any(p.grad is not None for p in d.connectors.parameters())
    opt.step()
    d.eval()
    with torch.no_grad():
        assert d(image=x).shape == (2, num_classes)
    return d


ALL_PAIRS = [("cifar", t, s) for t, s in CIFAR_PAIRS] + [("imagenet", t, s) for t, s in IMAGENET_PAIRS]


@pytest.mark.parametrize("zoo,teacher,student", ALL_PAIRS, ids=[f"{t}-{s}" for _, t, s in ALL_PAIRS])
def test_every_upstream_pair_trains_under_register(fake_mdistiller, zoo, teacher, student):
    """mdistiller's 11 CIFAR-100 pairs and its ImageNet ResNet pair: register(), models built by
    the stand-in's own classes, one Block-KD step."""
    cls = plugin.register()
    from mdistiller.engine.cfg import CFG

    cifar, imagenet = _standin_models()
    ctors, num_classes, size = (cifar, 100, 32) if zoo == "cifar" else (imagenet, 1000, 64)
    torch.manual_seed(0)
    up_t, up_s = ctors[teacher](num_classes=num_classes), ctors[student](num_classes=num_classes)
    d = _one_step(cls, CFG, up_t, up_s, size, num_classes)
    assert d.num_stones >= 2
    if zoo == "imagenet":
        assert (d.teacher.timm_name, d.student.timm_name) == (f"resnet{teacher[6:]}", f"resnet{student[6:]}")
    # upstream saves distiller.student.state_dict() as student_best: it loads into its own class
    ctors[student](num_classes=num_classes).load_state_dict(d.student.state_dict(), strict=True)
