"""Baseline distillers (KD, DKD, ReviewKD) and their mdistiller-style CIFAR-100 configs."""

import copy
import functools
import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mdistiller_blockkd.distillers import distiller_dict, losses
from mdistiller_blockkd.engine.build import make_distiller
from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "cifar100")
METHODS = {"kd": "KD", "dkd": "DKD", "reviewkd": "REVIEWKD"}
# file name -> (teacher, student, DKD beta or None = default 8.0)
PAIRS = {
    "res56_res20": ("resnet56", "resnet20", 2.0),
    "res110_res32": ("resnet110", "resnet32", 2.0),
    "res32x4_res8x4": ("resnet32x4", "resnet8x4", None),
    "wrn40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2", 6.0),
    "wrn40_2_wrn_40_1": ("wrn_40_2", "wrn_40_1", 6.0),
    "vgg13_vgg8": ("vgg13", "vgg8", 6.0),
    "res32x4_shuv1": ("resnet32x4", "ShuffleV1", None),
    "res32x4_shuv2": ("resnet32x4", "ShuffleV2", None),
    "res50_mv2": ("ResNet50", "MobileNetV2", None),
    "vgg13_mv2": ("vgg13", "MobileNetV2", 6.0),
    "wrn40_2_shuv1": ("wrn_40_2", "ShuffleV1", None),
}
LIGHT_STUDENTS = {"ShuffleV1", "ShuffleV2", "MobileNetV2"}


def cfg_path(method, pair):
    return os.path.join(CONFIGS, method, pair + ".yaml")


@functools.lru_cache(maxsize=None)
def _cached(name):
    from mdistiller_blockkd import models

    torch.manual_seed(0)
    net = models.build_model(name, num_classes=100)
    # calibrate the BN statistics on random images so that the frozen (eval-mode) random
    # network behaves like a trained one instead of amplifying its activations with depth
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(123)))
    for m in bns:
        m.momentum = 0.1
    return net.eval()


def model(name):
    """A fresh copy of a model built once per session (seeded, BN statistics calibrated)."""
    return copy.deepcopy(_cached(name))


def frozen(name):
    """The session's shared instance (for teachers, which the tests never modify)."""
    return _cached(name)


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g)


# ---------------------------------------------------------------------------- configs
def test_config_tree_is_complete():
    for method in METHODS:
        got = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIGS, method, "*.yaml")))
        assert got == sorted(PAIRS), method


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_config_recipe(method, pair):
    cfg = load_cfg(cfg_path(method, pair))
    teacher, student, beta = PAIRS[pair]
    assert cfg.DISTILLER.TYPE == METHODS[method]
    assert (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == (teacher, student)
    assert cfg.EXPERIMENT.PROJECT == "cifar100_baselines"
    assert cfg.EXPERIMENT.TAG.split(",")[0] == method
    s = cfg.SOLVER
    assert (s.BATCH_SIZE, s.EPOCHS, s.TYPE, s.MOMENTUM) == (64, 240, "SGD", 0.9)
    assert list(s.LR_DECAY_STAGES) == [150, 180, 210] and s.LR_DECAY_RATE == 0.1
    assert s.WEIGHT_DECAY == 5e-4
    assert s.LR == (0.01 if student in LIGHT_STUDENTS else 0.05)
    if method == "dkd":
        assert cfg.DKD.BETA == (beta if beta is not None else 8.0)
        assert (cfg.DKD.ALPHA, cfg.DKD.T, cfg.DKD.WARMUP, cfg.DKD.CE_WEIGHT) == (1.0, 4.0, 20, 1.0)
    if method == "reviewkd":
        assert cfg.REVIEWKD.REVIEWKD_WEIGHT == 5.0
        assert cfg.REVIEWKD.WARMUP_EPOCHS == 20
    if method == "kd":
        assert (cfg.KD.TEMPERATURE, cfg.KD.LOSS.CE_WEIGHT, cfg.KD.LOSS.KD_WEIGHT) == (4, 0.1, 0.9)


# ------------------------------------------------------------ one step for every pair
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_every_pair_and_method_takes_one_sgd_step(pair):
    teacher_name, student_name, _ = PAIRS[pair]
    teacher = frozen(teacher_name)
    x, y = batch()
    for method in sorted(METHODS):
        student = model(student_name)
        cfg = load_cfg(cfg_path(method, pair))
        distiller = make_distiller(cfg, student, teacher)  # the assembler: input size from the config
        distiller.train()
        params = distiller.get_learnable_parameters()
        teacher_ids = {id(p) for p in teacher.parameters()}
        assert params and not any(id(p) in teacher_ids for p in params)
        opt = torch.optim.SGD(params, lr=cfg.SOLVER.LR, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
        w0 = next(student.parameters()).detach().clone()

        logits, loss_dict = distiller(image=x, target=y, epoch=1)
        assert set(loss_dict) == {"loss_ce", "loss_kd"}, method
        loss = sum(v.mean() for v in loss_dict.values())
        assert torch.isfinite(loss), (pair, method, loss_dict)
        assert loss_dict["loss_kd"].item() > 0, (pair, method)
        assert logits.shape == (4, 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        assert all(p.grad is None for p in teacher.parameters()), (pair, method)
        assert not teacher.training and not any(m.training for m in teacher.modules()), (pair, method)
        t_after = teacher.state_dict()
        assert all(torch.equal(v, t_after[k]) for k, v in t_state.items()), (pair, method)
        assert not torch.equal(w0, next(student.parameters())), (pair, method)
        assert all(torch.isfinite(p).all() for p in params)
        if method == "reviewkd":
            # the teacher executor (possibly BN-folded) gives the teacher's own targets
            with torch.no_grad():
                got, want = distiller.teacher_forward(x)[1], teacher(x)[1]
            for a, b in zip(got["preact_feats"] + [got["pooled_feat"]], want["preact_feats"] + [want["pooled_feat"]]):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * max(1.0, b.abs().max().item()))
            assert distiller.get_extra_parameters() > 0
            assert all(p.grad is not None for p in distiller.abfs.parameters()), pair
        else:
            assert distiller.get_extra_parameters() == 0
        distiller.eval()
        with torch.no_grad():
            assert distiller(image=x).shape == (4, 100)


# ------------------------------------------------------------------------ KD and DKD
@pytest.fixture(scope="module")
def small_pair():
    return frozen("resnet20"), model("resnet8")


def _teacher_calls_per_step(d, x, y, **kw):
    """Run two steps; count the calls of the teacher executor during the second one.

    The first step may build the executor (a BN-folded copy of the teacher, probed once).
    """
    d.forward_train(x, y, **kw)
    executor = d.teacher_model(x)
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(1)) for m in {id(executor): executor, id(d.teacher): d.teacher}.values()]
    out = d.forward_train(x, y, **kw)
    for h in hooks:
        h.remove()
    return len(calls), out


def test_kd_matches_formula_and_runs_teacher_once(small_pair):
    teacher, student = small_pair
    cfg = load_cfg(opts=["DISTILLER.TYPE", "KD", "KD.TEMPERATURE", "2", "KD.LOSS.CE_WEIGHT", "0.3", "KD.LOSS.KD_WEIGHT", "0.7"])
    d = distiller_dict["KD"](student, teacher, cfg).train()
    x, y = batch(6, seed=1)
    calls, (logits, ld) = _teacher_calls_per_step(d, x, y)  # KD needs no epoch
    assert calls == 1
    with torch.no_grad():
        zt = d.teacher_forward(x)[0]
        torch.testing.assert_close(zt, teacher(x)[0], rtol=1e-4, atol=1e-4)
        zs = logits.detach().double()
        log_ps = torch.log(torch.exp(zs / 2) / torch.exp(zs / 2).sum(1, keepdim=True))
        pt = torch.exp(zt.double() / 2) / torch.exp(zt.double() / 2).sum(1, keepdim=True)
        kl = (pt * (torch.log(pt) - log_ps)).sum(1).mean()
        ce = -torch.log(torch.exp(zs) / torch.exp(zs).sum(1, keepdim=True))[torch.arange(6), y].mean()
    assert ld["loss_kd"].item() == pytest.approx(0.7 * 4 * kl.item(), rel=1e-4)
    assert ld["loss_ce"].item() == pytest.approx(0.3 * ce.item(), rel=1e-4)


def test_dkd_matches_losses_and_warms_up(small_pair):
    teacher, student = small_pair
    cfg = load_cfg(opts=["DKD.BETA", "2.0", "DKD.ALPHA", "0.5", "DKD.WARMUP", "20", "DKD.CE_WEIGHT", "1.0"])
    d = distiller_dict["DKD"](student, teacher, cfg).train()
    x, y = batch(6, seed=2)
    calls, (logits, full) = _teacher_calls_per_step(d, x, y, epoch=40)
    assert calls == 1
    with torch.no_grad():
        zt = d.teacher_forward(x)[0]
        tckd, nckd = losses.dkd_parts(logits.detach(), zt, y, 4.0)
    assert full["loss_kd"].item() == pytest.approx((0.5 * tckd + 2.0 * nckd).item(), rel=1e-5)
    assert full["loss_ce"].item() == pytest.approx(F.cross_entropy(logits.detach(), y).item(), rel=1e-5)
    _, part = d.forward_train(x, y, epoch=5)  # BN in train mode: same output for the same batch
    assert part["loss_kd"].item() == pytest.approx(0.25 * full["loss_kd"].item(), rel=1e-4)
    with pytest.raises(TypeError, match="epoch"):
        d.forward_train(x, y)


def test_lskd_is_kd_on_standardised_logits(small_pair):
    teacher, student = small_pair
    cfg = load_cfg(opts=["DISTILLER.TYPE", "LSKD", "LSKD.T", "3.0", "LSKD.CE_WEIGHT", "0.2", "LSKD.KD_WEIGHT", "5.0"])
    d = distiller_dict["LSKD"](student, teacher, cfg).train()
    x, y = batch(6, seed=3)
    calls, (logits, ld) = _teacher_calls_per_step(d, x, y)
    assert calls == 1
    with torch.no_grad():
        zt = d.teacher_forward(x)[0].double()
        zs = logits.detach().double()
        z = lambda v: (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True)  # noqa: E731
        pt = torch.softmax(z(zt) / 3, 1)
        kl = (pt * (torch.log(pt) - torch.log_softmax(z(zs) / 3, 1))).sum(1).mean() * 9
    assert ld["loss_kd"].item() == pytest.approx(5 * kl.item(), rel=1e-4)
    assert ld["loss_ce"].item() == pytest.approx(0.2 * F.cross_entropy(logits.detach(), y).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="LSKD.T is 0.0"):
        distiller_dict["LSKD"](student, teacher, load_cfg(opts=["LSKD.T", "0.0"]))


def test_reviewkd_batch_of_one_is_a_clear_error(small_pair):
    teacher, student = small_pair
    with pytest.raises(ConfigError, match="SOLVER.BATCH_SIZE is 1"):
        distiller_dict["REVIEWKD"].check_cfg(load_cfg(opts=["SOLVER.BATCH_SIZE", "1"]))
    d = make_distiller(load_cfg(opts=["DATASET.TYPE", "synthetic"]), student, teacher, "REVIEWKD").train()
    with pytest.raises(ConfigError, match="batch of 1 image"):
        d.forward_train(*batch(1), epoch=1)


@pytest.mark.parametrize("typ", ["KD", "LSKD", "DKD", "REVIEWKD"])
def test_teacher_is_required(typ, small_pair):
    with pytest.raises(ConfigError, match="teacher"):
        distiller_dict[typ](small_pair[1], None, load_cfg())


# --------------------------------------------------------------------------- ReviewKD
def test_reviewkd_res32x4_res8x4_extra_parameters():
    cfg = load_cfg(cfg_path("reviewkd", "res32x4_res8x4"))
    d = distiller_dict["REVIEWKD"](model("resnet8x4"), frozen("resnet32x4"), cfg, input_size=32)
    assert d.get_extra_parameters() == 1_808_774  # "1.81 M"
    assert d.in_channels == d.out_channels == [64, 128, 256, 256]
    assert d.shapes == d.out_shapes == [1, 8, 16, 32]
    # mdistiller's state-dict layout: abfs.0 is the deepest (unfused) level
    keys = set(d.state_dict())
    assert "abfs.0.conv1.0.weight" in keys and "abfs.0.att_conv.0.weight" not in keys
    assert {"abfs.3.att_conv.0.weight", "abfs.3.conv2.1.running_var"} <= keys
    assert d.abfs[3].conv1[0].in_channels == 64 and d.abfs[0].conv2[0].out_channels == 256


def test_reviewkd_derives_geometry_for_other_pairs():
    d = distiller_dict["REVIEWKD"](model("ShuffleV1"), frozen("resnet32x4"), load_cfg(), input_size=32)
    assert d.in_channels == [240, 480, 960, 960] and d.out_channels == [64, 128, 256, 256]
    assert d.shapes == [1, 4, 8, 16] and d.out_shapes == [1, 8, 16, 32]
    d = distiller_dict["REVIEWKD"](model("resnet20"), frozen("wrn_40_2"), load_cfg(), input_size=32)
    assert d.in_channels == [16, 32, 64, 64] and d.out_channels == [32, 64, 128, 128]
    assert d.abfs[0].conv1[0].out_channels == 64  # mid = min(MAX_MID_CHANNEL, deepest width)


def test_reviewkd_mid_channel_capped_and_stu_preact():
    cfg = load_cfg(opts=["REVIEWKD.MAX_MID_CHANNEL", "32", "REVIEWKD.STU_PREACT", "True"])
    d = distiller_dict["REVIEWKD"](model("resnet8"), frozen("resnet20"), cfg, input_size=32).train()
    assert all(abf.conv1[0].out_channels == 32 for abf in d.abfs)
    x, y = batch(2, seed=3)
    _, ld = d.forward_train(x, y, epoch=10)
    assert torch.isfinite(ld["loss_kd"])


def test_reviewkd_explicit_values():
    student, teacher = model("resnet8"), frozen("resnet20")
    # mdistiller-style explicit lists that agree with the models are accepted
    ok = load_cfg(opts=["REVIEWKD.IN_CHANNELS", "[16, 32, 64, 64]", "REVIEWKD.OUT_CHANNELS", "[16, 32, 64, 64]"])
    d = distiller_dict["REVIEWKD"](student, teacher, ok, input_size=32)
    assert d.in_channels == [16, 32, 64, 64] and d.shapes == [1, 8, 16, 32]
    # fewer levels: the deepest ones are used
    three = load_cfg(opts=["REVIEWKD.IN_CHANNELS", "[32, 64, 64]", "REVIEWKD.OUT_CHANNELS", "[32, 64, 64]"])
    d = distiller_dict["REVIEWKD"](student, teacher, three, input_size=32).train()
    assert d.shapes == [1, 8, 16] and len(d.abfs) == 3
    _, ld = d.forward_train(*batch(2), epoch=1)
    assert torch.isfinite(ld["loss_kd"])
    bad = [
        ["REVIEWKD.IN_CHANNELS", "[8, 32, 64, 64]"],
        ["REVIEWKD.IN_CHANNELS", "[16, 32, 64, 64]", "REVIEWKD.OUT_CHANNELS", "[32, 64, 64]"],
        ["REVIEWKD.IN_CHANNELS", "[16, 16, 32, 64, 64]", "REVIEWKD.OUT_CHANNELS", "[16, 16, 32, 64, 64]"],
    ]
    for opts in bad:
        with pytest.raises(ConfigError, match="REVIEWKD"):
            distiller_dict["REVIEWKD"](student, teacher, load_cfg(opts=opts), input_size=32)
    wrong_shape = load_cfg(opts=["REVIEWKD.SHAPES", "[1, 8, 16, 16]"])
    d = distiller_dict["REVIEWKD"](student, teacher, wrong_shape, input_size=32).train()
    assert d.shapes == [1, 8, 16, 16]  # explicit values win...
    with pytest.raises(ConfigError, match="SHAPES"):  # ...and a wrong one is named
        d.forward_train(*batch(2), epoch=1)


def test_reviewkd_warmup_and_teacher_once():
    cfg = load_cfg(opts=["REVIEWKD.REVIEWKD_WEIGHT", "5.0", "REVIEWKD.CE_WEIGHT", "0.5"])
    student, teacher = model("resnet8"), frozen("resnet20")
    d = distiller_dict["REVIEWKD"](student, teacher, cfg, input_size=32).train()
    x, y = batch(4, seed=4)
    calls, (logits, full) = _teacher_calls_per_step(d, x, y, epoch=25)
    assert calls == 1
    _, part = d.forward_train(x, y, epoch=4)
    assert part["loss_kd"].item() == pytest.approx(0.2 * full["loss_kd"].item(), rel=1e-4)
    assert full["loss_ce"].item() == pytest.approx(0.5 * F.cross_entropy(logits.detach(), y).item(), rel=1e-5)
    # the loss is 5 * HCL of the ABF outputs against the teacher's preact levels
    with torch.no_grad():
        _, ft = d.teacher_forward(x)
        _, fs = student(x)
        results = d.review(fs["feats"][1:] + [fs["pooled_feat"][:, :, None, None]])
        targets = ft["preact_feats"][1:] + [ft["pooled_feat"][:, :, None, None]]
        assert [r.shape for r in results] == [t.shape for t in targets]
        assert math.isclose(full["loss_kd"].item(), 5.0 * losses.hcl_loss(results, targets).item(), rel_tol=1e-4)
    with pytest.raises(TypeError, match="epoch"):
        d.forward_train(x, y)


def test_abf_matches_the_reference_formula():
    """The split attention conv equals att_conv(cat[conv1(x), up(r)]) in value and gradient."""
    from mdistiller_blockkd.distillers.reviewkd import ABF

    torch.manual_seed(5)
    abf = ABF(6, 8, 5, fuse=True).train()
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    abf.double()
    weights = torch.randn(3, 5, 8, 8, dtype=torch.float64), torch.randn(3, 8, 8, 8, dtype=torch.float64)

    def reference(x, r):
        h = abf.conv1(x)
        up = F.interpolate(r, size=(8, 8), mode="nearest")
        a = abf.att_conv(torch.cat([h, up], dim=1))
        f = h * a[:, 0:1] + up * a[:, 1:2]
        return abf.conv2(f), f

    params = [x, r] + list(abf.parameters())
    for out_shape in (8, 16):
        got, want = abf(x, r, 8, out_shape), reference(x, r)
        if out_shape != 8:
            want = (abf.conv2(F.interpolate(want[1], size=(16, 16), mode="nearest")), F.interpolate(want[1], size=(16, 16), mode="nearest"))
            weights = torch.randn(3, 5, 16, 16, dtype=torch.float64), torch.randn(3, 8, 16, 16, dtype=torch.float64)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        g_got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(got, weights)), params)
        g_want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want, weights)), params)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b)
    # the deepest level has no fusion: conv2(conv1(x))
    top = ABF(6, 8, 5, fuse=False).double().eval()
    out, res = top(x, out_shape=8)
    torch.testing.assert_close(out, top.conv2(top.conv1(x)))
    assert top.att_conv is None and sum(p.numel() for p in top.parameters()) == 6 * 8 + 16 + 8 * 5 * 9 + 10

