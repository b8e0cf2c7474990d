"""timm backbones as staged models, ImageNet configs, Block-KD on timm pairs."""

import copy
import glob
import os

import pytest
import timm
import torch

from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.errors import CheckpointError, ConfigError
from mdistiller_blockkd.models import build_model
from mdistiller_blockkd.models.staged import StagedModel
from mdistiller_blockkd.models.timm_backbone import TimmStagedModel, load_timm_checkpoint
from mdistiller_blockkd.utils.checkpoint import read_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_CFGS = os.path.join(ROOT, "configs", "imagenet")
SIZE = 64
NAMES = ["resnet18", "resnet34", "resnet50", "mobilenetv1_100"]


def _x(n=2, size=SIZE, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    return {n: build_model(f"timm:{n}", num_classes=10) for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_staged_view_reproduces_timm(zoo, name):
    m = zoo[name]
    assert isinstance(m, StagedModel) and isinstance(m, TimmStagedModel)
    m.eval()
    x = _x()
    with torch.no_grad():
        ref = m.timm_model(x)
        logits, feats = m(x)
        view = m.staged_view()
        via_view = view(x)
    assert ref.shape == (2, 10)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_view, ref, rtol=1e-5, atol=1e-5)
    # feature_info is timm's and truthful: channels and output stride of every feature
    assert m.feature_info == [dict(num_chs=d["num_chs"], reduction=d["reduction"], module=d["module"])
                              for d in m.timm_model.feature_info]
    assert len(feats["feats"]) == m.num_blocks + 1 == view.num_blocks + 1
    for d, f in zip(m.feature_info, feats["feats"]):
        assert f.shape == (2, d["num_chs"], SIZE // d["reduction"], SIZE // d["reduction"])
    assert all(a is b for a, b in zip(feats["feats"], feats["preact_feats"]))
    assert feats["pooled_feat"].shape == (2, m.num_features)
    # the block outputs of the view are the features after the stem
    with torch.no_grad():
        for a, b in zip(view.block_outputs(x), feats["feats"][1:]):
            torch.testing.assert_close(a, b)


def test_stem_and_blocks_follow_feature_info(zoo):
    r18 = zoo["resnet18"]
    assert r18.steps["stem"] == ["conv1", "bn1", "act1"]
    assert r18.steps["blocks"] == [["maxpool", "layer1"], ["layer2"], ["layer3"], ["layer4"]]
    mv1 = zoo["mobilenetv1_100"]
    assert mv1.steps["stem"] == ["conv_stem", "bn1", "blocks.0"]
    assert mv1.steps["blocks"] == [["blocks.1"], ["blocks.2"], ["blocks.3"], ["blocks.4"]]
    assert [d["reduction"] for d in r18.feature_info] == [2, 4, 8, 16, 32]


def test_blocks_pair_by_output_stride(zoo):
    def strides(m):
        return [b.reduction for b in m.staged_view().block_info]

    assert strides(zoo["resnet34"]) == strides(zoo["resnet18"]) == [4, 8, 16, 32]
    assert strides(zoo["resnet50"]) == strides(zoo["mobilenetv1_100"]) == [4, 8, 16, 32]
    # a teacher block can run on the (channel-matched) output of the student block of the same stride
    t, s = zoo["resnet34"], zoo["resnet18"]
    with torch.no_grad():
        h = s.staged_view().block_outputs(_x())[1]
        out = t.staged_view().forward_from(h, 2)
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_are_timm_keys(zoo, name):
    m = zoo[name]
    plain = timm.create_model(name, num_classes=10)
    a, b = m.state_dict(), plain.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    plain.load_state_dict(a, strict=True)
    plain.eval()
    m.eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), m(x)[0], rtol=1e-5, atol=1e-5)


def test_train_mode_and_copy_keep_the_timm_model_in_sync():
    m = build_model("timm:resnet18", num_classes=5, drop_rate=0.5)
    m.train()
    assert m.timm_model.training and m.fc.training
    m.eval()
    assert not m.timm_model.training and not m.fc.training
    with torch.no_grad():
        a, b = m(_x())[0], m(_x())[0]
    torch.testing.assert_close(a, b)  # eval: head dropout off
    c = copy.deepcopy(m)
    assert c.timm_model.fc is c.fc and c.fc is not m.fc
    assert m.get_classifier() is m.fc
    m.reset_classifier(3)
    assert m.fc.out_features == 3 and m.get_classifier() is m.fc and m.state_dict()["fc.weight"].shape[0] == 3


@pytest.mark.parametrize("name,head", [("efficientnet_b0", ["conv_head", "bn2"]), ("convnext_atto", [])])
def test_other_timm_cnns_are_staged_from_their_metadata(name, head):
    m = build_model(f"timm:{name}", num_classes=7).eval()
    assert m.steps["head"] == head
    with torch.no_grad():
        torch.testing.assert_close(m.staged_view()(_x()), m.timm_model(_x()), rtol=1e-5, atol=1e-5)


def test_non_cnn_and_unknown_names_are_refused():
    # transformers other than timm's VisionTransformer (ViTs: tests/test_hf_models.py) are refused
    with pytest.raises(ConfigError, match="mixer_s16_224.*NCHW"):
        build_model("timm:mixer_s16_224", num_classes=10)
    with pytest.raises(ConfigError, match="resnet1800.*did you mean"):
        build_model("timm:resnet1800", num_classes=10)
    with pytest.raises(ConfigError, match="unexpected_arg"):
        build_model("timm:resnet18", num_classes=10, unexpected_arg=1)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("timm:resnet18", num_classes=0)


def test_pretrained_offline_says_to_pass_a_local_checkpoint(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CheckpointError, match="could not download .*resnet18.*local checkpoint path"):
        build_model("timm:resnet18", num_classes=10, pretrained=True)


def test_pretrained_local_checkpoint_formats(tmp_path):
    src = timm.create_model("resnet18", num_classes=10)
    sd = src.state_dict()
    files = {
        "plain.pth": sd,
        "mdistiller.pth": {"model": sd},
        "timm_train.pth": {"epoch": 3, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }
    for fname, obj in files.items():
        torch.save(obj, tmp_path / fname)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for fname in list(files) + ["w.safetensors"]:
        m = build_model("timm:resnet18", num_classes=10, pretrained=str(tmp_path / fname))
        got = m.state_dict()
        assert all(torch.equal(got[k], sd[k]) for k in sd), fname
    # the helper loads into a staged model or a plain timm model alike
    fresh = build_model("timm:resnet18", num_classes=10)
    load_timm_checkpoint(fresh, tmp_path / "mdistiller.pth")
    fresh.load_timm_state_dict({"state_dict": sd})
    assert torch.equal(fresh.fc.weight, sd["fc.weight"])
    assert set(read_state_dict(tmp_path / "timm_train.pth")) == set(sd)
    with pytest.raises(CheckpointError, match="fc.weight"):
        build_model("timm:resnet18", num_classes=100, pretrained=str(tmp_path / "plain.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        build_model("timm:resnet18", num_classes=10, pretrained=str(tmp_path / "missing.pth"))
    torch.save({"epoch": 1}, tmp_path / "nostate.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        read_state_dict(tmp_path / "nostate.pth")


def test_mobilenetv1_exists_in_timm():
    assert "mobilenetv1_100" in timm.list_models("mobilenetv1*")


# -- ImageNet configs --------------------------------------------------------------------
EXPECTED = {
    "r34_r18": ("timm:resnet34.tv_in1k", "timm:resnet18"),
    "r50_mv1": ("timm:resnet50.tv_in1k", "timm:mobilenetv1_100"),
}


def test_imagenet_teachers_are_torchvisions_weights():
    """mdistiller's ImageNet numbers use torchvision's teachers: timm's ``tv_in1k`` tags (224 px),
    not timm's default tags (``a1_in1k``, another recipe, evaluated at 288 px)."""
    paths = sorted(glob.glob(os.path.join(IMAGENET_CFGS, "*", "*.yaml")))
    assert paths
    for p in paths:
        name = load_cfg(p).DISTILLER.TEACHER
        assert name.endswith(".tv_in1k"), (p, name)
        cfg = build_model(name, num_classes=10).pretrained_cfg  # no download: only timm's metadata
        assert cfg["tag"] == "tv_in1k" and tuple(cfg["input_size"]) == (3, 224, 224)
        assert cfg.get("test_input_size") in (None, (3, 224, 224))


def test_imagenet_configs_load_with_the_recipe():
    paths = sorted(glob.glob(os.path.join(IMAGENET_CFGS, "*", "*.yaml")))
    assert len(paths) == 8
    for p in paths:
        method, pair = os.path.basename(os.path.dirname(p)), os.path.basename(p)[:-5]
        cfg = load_cfg(p)
        assert cfg.DISTILLER.TYPE == method.upper()
        assert (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == EXPECTED[pair]
        assert cfg.DATASET.TYPE == "imagenet" and cfg.DISTILLER.TEACHER_PRETRAINED is True
        s = cfg.SOLVER
        assert (s.EPOCHS, list(s.LR_DECAY_STAGES), s.LR_DECAY_RATE, s.WEIGHT_DECAY, s.MOMENTUM) == (
            100, [30, 60, 90], 0.1, 1e-4, 0.9)
        # mdistiller's ImageNet recipe; its ReviewKD YAMLs use the same LR / batch ratio at 256
        assert (s.BATCH_SIZE, s.LR) == ((256, 0.1) if method == "reviewkd" else (512, 0.2))
        if method == "kd":
            assert (cfg.KD.TEMPERATURE, cfg.KD.LOSS.CE_WEIGHT, cfg.KD.LOSS.KD_WEIGHT) == (1, 0.5, 0.5)
        if method == "dkd":
            assert (cfg.DKD.CE_WEIGHT, cfg.DKD.ALPHA, cfg.DKD.T, cfg.DKD.WARMUP) == (1.0, 1.0, 1.0, 1)
            assert cfg.DKD.BETA == (0.5 if pair == "r34_r18" else 2.0)
        if method == "reviewkd":
            assert cfg.REVIEWKD.WARMUP_EPOCHS == 1 and cfg.REVIEWKD.STU_PREACT
            assert cfg.REVIEWKD.REVIEWKD_WEIGHT == (1.0 if pair == "r34_r18" else 8.0)
        if method == "blockkd":
            assert (cfg.BLOCKKD.T, cfg.BLOCKKD.WARMUP) == (1.0, 1)


def test_reviewkd_imagenet_levels_match_mdistiller():
    from mdistiller_blockkd.engine.build import make_distiller

    upstream = {
        "r34_r18": ([64, 128, 256, 512, 512], [64, 128, 256, 512, 512]),
        "r50_mv1": ([128, 256, 512, 1024, 1024], [256, 512, 1024, 2048, 2048]),
    }
    for pair, (t, s) in EXPECTED.items():
        cfg = load_cfg(os.path.join(IMAGENET_CFGS, "reviewkd", f"{pair}.yaml"))
        d = make_distiller(cfg, build_model(s, num_classes=10), build_model(t, num_classes=10))  # input size 224
        assert (d.in_channels, d.out_channels) == upstream[pair]
        assert d.shapes == d.out_shapes == [1, 7, 14, 28, 56]


# -- Block-KD on timm pairs ------------------------------------------------------------------
@pytest.mark.parametrize("pair", ["r34_r18", "r50_mv1"])
def test_blockkd_step_on_timm_pair(pair):
    from mdistiller_blockkd.distillers import distiller_dict

    torch.manual_seed(0)
    cfg = load_cfg(os.path.join(IMAGENET_CFGS, "blockkd", f"{pair}.yaml"))
    t_name, s_name = EXPECTED[pair]
    student, teacher = build_model(s_name, num_classes=10), build_model(t_name, num_classes=10)
    d = distiller_dict["BLOCKKD"](student, teacher, cfg)
    assert d.num_stones == 4  # every block pairs by output stride
    d.train()
    assert not d.teacher.training
    opt = torch.optim.SGD(d.get_learnable_parameters(), lr=0.1)
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    t_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    logits, losses = d.forward_train(image=_x(), target=torch.tensor([1, 7]), epoch=1)
    loss = sum(v.mean() for v in losses.values())
    assert logits.shape == (2, 10) and torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = d.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(t_before[k], v) for k, v in d.teacher.state_dict().items())


def test_module_replacement_is_seen_by_both_views():
    m = build_model("timm:resnet18", num_classes=4).eval()
    new_fc = torch.nn.Linear(512, 4)
    m.fc = new_fc
    assert m.timm_model.fc is new_fc and m.get_classifier() is new_fc
    with torch.no_grad():
        torch.testing.assert_close(m(_x())[0], m.timm_model(_x()))
