"""Block-KD: stepping stones, pairing, loss terms, sampling, gradients, cost structure."""

import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mdistiller_blockkd.distillers import distiller_dict
from mdistiller_blockkd.distillers.blockkd import BlockKD, pair_blocks
from mdistiller_blockkd.distillers.blockkd_core import distance as logit_distance
from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.errors import ConfigError
from mdistiller_blockkd.models import build_model
from mdistiller_blockkd.models.staged import StageInfo

from helpers import randomize_bn

UPSTREAM_PAIRS = [
    ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"),
    ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("ResNet50", "MobileNetV2"),
    ("vgg13", "MobileNetV2"), ("wrn_40_2", "ShuffleV1"),
]


def make(teacher="resnet20", student="resnet8", num_classes=10, **opts):
    torch.manual_seed(0)
    flat = ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.WARMUP", 0, "DISTILLER.FOLD_TEACHER_BN", opts.pop("FOLD", True)]
    for k, v in opts.items():
        flat += [f"BLOCKKD.{k}", v]
    cfg = load_cfg(None, flat)
    t = build_model(teacher, num_classes=num_classes)
    s = build_model(student, num_classes=num_classes)
    return distiller_dict["BLOCKKD"](s, t, cfg)


def batch(n=4, num_classes=10, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def kl_by_hand(zs, zt, T):
    pt = torch.softmax(zt / T, 1)
    return (pt * (torch.log(pt) - torch.log_softmax(zs / T, 1))).sum(1).mean() * T * T


def view(reductions, chs=None):
    chs = chs or [16] * len(reductions)
    return SimpleNamespace(num_blocks=len(reductions), block_info=[StageInfo(c, r) for c, r in zip(chs, reductions)])


def test_registered():
    assert distiller_dict["BLOCKKD"] is BlockKD


def test_pairing_rules():
    # equal strides pair up one to one
    assert pair_blocks(view([1, 2, 4]), view([1, 2, 4])) == [(0, 0), (1, 1), (2, 2)]
    # several blocks at one stride: the deepest pair up in order (vgg)
    assert pair_blocks(view([2, 4, 8, 8]), view([2, 4, 8, 8])) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert pair_blocks(view([4, 8]), view([2, 4, 8, 8])) == [(0, 1), (1, 3)]
    # last strides differ (ShuffleV1 /2,/4,/8 vs resnet32x4 /1,/2,/4): the last blocks pair in order
    assert pair_blocks(view([2, 4, 8]), view([1, 2, 4])) == [(0, 0), (1, 1), (2, 2)]
    assert pair_blocks(view([2, 4, 8, 16]), view([1, 2, 4, 8])) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    # explicit pairs win (1-based in the config)
    assert pair_blocks(view([1, 2, 4]), view([1, 2, 4]), [[2, 1], [3, 3]]) == [(1, 0), (2, 2)]
    for bad in ([[0, 1]], [[4, 1]], [[2, 2], [1, 3]], [[1]]):
        with pytest.raises(ConfigError, match="BLOCKKD.PAIRS"):
            pair_blocks(view([1, 2, 4]), view([1, 2, 4]), bad)


@pytest.mark.parametrize("key,value,match", [
    ("T", 0.0, "BLOCKKD.T is 0.0"), ("T", -1.0, "BLOCKKD.T is -1.0"), ("WARMUP", -5, "BLOCKKD.WARMUP is -5"),
    ("PAIRS", [1, 2], "BLOCKKD.PAIRS entry 1"), ("PAIRS", [["a", "b"]], "BLOCKKD.PAIRS entry"),
    ("PAIRS", [[1, 2, 3]], "BLOCKKD.PAIRS entry"), ("STONES", "every:0", "BLOCKKD.STONES"),
    ("STONE_SCALE", "half", "BLOCKKD.STONE_SCALE"), ("STONE_WEIGHTS", "linear", "BLOCKKD.STONE_WEIGHTS"),
    ("GAMMA", -1.0, "BLOCKKD.GAMMA"), ("DENSE_EPOCHS", -1, "BLOCKKD.DENSE_EPOCHS is -1"),
])
def test_invalid_values_are_config_errors_before_building(key, value, match):
    """Checked by BlockKD itself and by the fail-fast config check (no model built)."""
    from mdistiller_blockkd.distillers.blockkd import check_options

    cfg = load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD"])
    cfg.defrost()
    cfg.BLOCKKD[key] = value
    with pytest.raises(ConfigError, match=match):
        check_options(cfg.BLOCKKD)
    with pytest.raises(ConfigError, match=match):
        make(**{key: value})


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="STONES"):
        make(STONES="sample:9")
    with pytest.raises(ConfigError, match="STONES"):
        make(STONES="first:1")
    with pytest.raises(ConfigError, match="CONNECTOR"):
        make(CONNECTOR="mlp")
    with pytest.raises(ConfigError, match="LOGIT_LOSS"):
        make(LOGIT_LOSS="mse")
    with pytest.raises(ConfigError, match="BATCH_STONES"):
        make(BATCH_STONES="maybe")


def test_deepest_stone_is_student_backbone_plus_teacher_head():
    d = make().eval()
    x, _ = batch()
    s_logits, stones, t_logits = d.forward_stones(x)
    assert len(stones) == 3 and d.stone_weights == [0.25, 0.5, 1.0]
    with torch.no_grad():
        feat = d.student.forward_features(x)
        want = d.teacher.forward_head(d.connectors[2](feat))
        torch.testing.assert_close(stones[2], want)
        torch.testing.assert_close(s_logits, d.student(x)[0])
        torch.testing.assert_close(t_logits, d.teacher(x)[0])
        # stone 1 = teacher blocks 2..3 + head on the connected student block-1 output
        h = d.student.forward_block(0, d.student.forward_stem(x)[0])[0]
        h = d.connectors[0](h)
        for j in (1, 2):
            h = d.teacher.forward_block(j, h)[0]
        torch.testing.assert_close(stones[0], d.teacher.forward_head(h))


def test_batched_stones_equal_separate_stones():
    d = make().eval()
    x, _ = batch()
    with torch.no_grad():
        d.opts = dataclasses.replace(d.opts, batch_stones="on")
        _, a, _ = d.forward_stones(x)
        d.opts = dataclasses.replace(d.opts, batch_stones="off")
        _, b, _ = d.forward_stones(x)
    for za, zb in zip(a, b):
        torch.testing.assert_close(za, zb, rtol=1e-5, atol=1e-5)


def test_gradients_teacher_frozen_and_eval():
    d = make()
    d.train()
    assert not d.teacher.training and d.student.training
    assert all(not p.requires_grad for p in d.teacher.parameters())
    x, y = batch()
    _, loss = d.forward_train(image=x, target=y, epoch=1)
    assert set(loss) == {"loss_ce", "loss_kd", "loss_cross"}
    sum(loss.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.student.parameters())
    assert all(p.grad is not None for p in d.connectors.parameters())
    learn = {id(p) for p in d.get_learnable_parameters()}
    assert learn == {id(p) for p in d.student.parameters()} | {id(p) for p in d.connectors.parameters()}
    assert d.get_extra_parameters() == sum(p.numel() for p in d.connectors.parameters())
    assert not d.teacher.training


def test_teacher_runs_once_per_step_and_each_teacher_block_once():
    d = make(FOLD=False, BATCH_STONES="on")
    calls = {"stem": 0, "grad_stem": 0, "head": 0}
    t = d.teacher
    orig_stem, orig_block, orig_head = t.forward_stem, t.forward_block, t.forward_head
    blocks = []

    def stem(x):
        calls["stem"] += 1
        calls["grad_stem"] += torch.is_grad_enabled()
        return orig_stem(x)

    def block(i, h):
        blocks.append(i)
        return orig_block(i, h)

    def head(h, pre_logits=False):
        calls["head"] += 1
        return orig_head(h, pre_logits)

    t.forward_stem, t.forward_block, t.forward_head = stem, block, head
    x, y = batch()
    d.forward_train(image=x, target=y, epoch=1)
    assert calls["stem"] == 1 and calls["grad_stem"] == 0
    # teacher's own forward: blocks 0,1,2; stones batched: blocks 1,2 once each; two heads
    assert sorted(blocks) == [0, 1, 1, 2, 2] and calls["head"] == 2


def test_task_terms_only_equal_hand_computation():
    d = make(ALPHA=1.0, BETA=0.0, GAMMA=0.0).eval()  # eval: BN uses running stats, deterministic
    x, y = batch()
    torch.manual_seed(0)
    s, stones, _ = d.forward_stones(x)
    want = F.cross_entropy(s, y) + sum(w * F.cross_entropy(z, y) for w, z in zip([0.25, 0.5, 1.0], stones))
    _, loss = d.forward_train(image=x, target=y, epoch=5)
    torch.testing.assert_close(sum(loss.values()), want)
    torch.testing.assert_close(loss["loss_kd"], torch.tensor(0.0))


@pytest.mark.parametrize("weight_cross", [True, False])
def test_distill_and_cross_terms_equal_hand_computation(weight_cross):
    T = 3.0
    d = make(ALPHA=0.5, BETA=2.0, GAMMA=0.7, T=T, WARMUP=10, WEIGHT_CROSS=weight_cross).eval()
    x, y = batch()
    s, stones, t = d.forward_stones(x)
    w = [0.25, 0.5, 1.0]
    ens = torch.stack(stones).mean(0)
    distill = kl_by_hand(s, t, T) + sum(wi * kl_by_hand(z, t, T) for wi, z in zip(w, stones))
    cw = w if weight_cross else [1.0, 1.0, 1.0]
    cross = kl_by_hand(s, ens, T) + sum(wi * kl_by_hand(z, ens, T) for wi, z in zip(cw, stones))
    task = F.cross_entropy(s, y) + sum(wi * F.cross_entropy(z, y) for wi, z in zip(w, stones))
    _, loss = d.forward_train(image=x, target=y, epoch=4)  # warm-up factor 0.4
    torch.testing.assert_close(loss["loss_ce"], 0.5 * task, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss["loss_kd"], 2.0 * 0.4 * distill, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss["loss_cross"], 0.7 * 0.4 * cross, rtol=1e-4, atol=1e-5)


def _cross_by_hand(d, x, y, detach):
    """Block-KD's cross term rebuilt from forward_stones with the ensemble detached or not."""
    s, stones, _ = d.forward_stones(x)
    ens = torch.stack(stones).mean(0)
    if detach:
        ens = ens.detach()
    T = d.opts.loss.T
    return kl_by_hand(s, ens, T) + sum(w * kl_by_hand(z, ens, T) for w, z in zip(d.stone_weights, stones))


@pytest.mark.parametrize("detach", [True, False])
def test_detached_ensemble_gradients_match_the_formula(detach):
    """Gradients of the cross term equal the hand-built ones with exactly Y^E detached (or not).

    Detaching anything else (a stone, the student) or nothing changes them, so this fails
    for the wrong tensor detached.
    """
    x, y = batch()
    d = make(ALPHA=0.0, BETA=0.0, GAMMA=1.0, DETACH_ENSEMBLE=detach).eval()
    params = [d.connectors[0].proj[0].weight, d.connectors[2].proj[0].weight, d.student.conv1.weight]
    _, loss = d.forward_train(image=x, target=y, epoch=1)
    got = torch.autograd.grad(loss["loss_cross"], params)
    want = torch.autograd.grad(_cross_by_hand(d, x, y, detach), params)
    other = torch.autograd.grad(_cross_by_hand(d, x, y, not detach), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(w, o, rtol=1e-3, atol=1e-6) for w, o in zip(want, other))


@pytest.mark.parametrize("distance", ["dkd", "lskd"])
def test_other_distances(distance):
    d = make(LOGIT_LOSS=distance).eval()
    x, y = batch()
    s, stones, t = d.forward_stones(x)
    from mdistiller_blockkd.distillers import losses
    want = losses.dkd_loss(s, t, y, 1.0, 8.0, 4.0) if distance == "dkd" else losses.kd_loss(
        losses.standardize(s), losses.standardize(t), 4.0)
    torch.testing.assert_close(logit_distance(d.opts.loss, s, t, y), want)
    _, loss = d.forward_train(image=x, target=y, epoch=1)
    assert all(torch.isfinite(v) for v in loss.values())


def test_last_k_builds_and_scores_only_its_stones():
    full, d = make(), make(STONES="last:2")
    assert len(d.connectors) == 2 and d.stone_ids == [2, 3]
    assert d.pairs == full.pairs[1:] and d.stone_weights == full.stone_weights[1:]
    assert d.planner.active(d) == ([0, 1], 1.0)
    assert not d.has_unused_parameters  # every connector it has trains every step
    x, y = batch()
    assert sorted(d.eval_logits(x)) == ["stone2", "stone3", "teacher"]
    assert "stone1" not in d.describe() and "stone2" in d.describe()
    _, loss = d.train().forward_train(image=x, target=y, epoch=1)
    sum(loss.values()).backward()
    assert all(p.grad is not None for p in d.connectors.parameters())


def test_describe_names_the_teacher_part_of_each_stone():
    head, *lines = make().describe().splitlines()
    assert head.startswith("BlockKD: student") and "extra parameters" in head  # the base class's line
    assert "teacher blocks 2..3 + head" in lines[0]
    assert "teacher block 3 + head" in lines[1]
    assert "teacher head only" in lines[2] and "4..3" not in lines[2]
    assert len(lines) == 3


def test_describe_states_the_stones_not_study_conclusions():
    """describe() says what runs (one line per stone); what the studies concluded lives in the docs."""
    for stones in ("sample:1", "every:3", "last:2"):
        assert "note:" not in make(STONES=stones).describe()


def test_every_k_runs_all_stones_one_step_in_k():
    d = make(STONES="every:3")
    assert d.has_unused_parameters
    draws = [d.planner.active(d) for _ in range(7)]
    assert draws == [([0, 1, 2], 3.0), ([], 1.0), ([], 1.0)] * 2 + [([0, 1, 2], 3.0)]
    # the step count travels with the state_dict (exact resume)
    e = make(STONES="every:3")
    e.load_state_dict(d.state_dict())
    assert e.planner.active(e) == d.planner.active(d) == ([], 1.0)
    # STONE_SCALE none: the stones weigh what they weigh under all
    n = make(STONES="every:2", STONE_SCALE="none")
    assert n.planner.active(n) == ([0, 1, 2], 1.0)


def test_every_k_losses():
    """A stone step equals all's loss (scale none) or K times its stone and cross terms; other steps are KD-like."""
    x, y = batch()
    full = make(STONES="all").eval()
    with torch.no_grad():
        _, ref = full.forward_train(image=x, target=y, epoch=30)
        s, stones, t = full.forward_stones(x)
        for scale, k in (("none", 1.0), ("unbiased", 2.0)):
            d = make(STONES="every:2", STONE_SCALE=scale).eval()
            d.load_state_dict(full.state_dict())
            _, on = d.forward_train(image=x, target=y, epoch=30)
            _, off = d.forward_train(image=x, target=y, epoch=30)
            task_s = F.cross_entropy(s, y)
            torch.testing.assert_close(on["loss_ce"], task_s + k * (ref["loss_ce"] - task_s), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(on["loss_cross"], k * ref["loss_cross"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(off["loss_ce"], task_s, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(off["loss_kd"], kl_by_hand(s, t, 4.0), rtol=1e-4, atol=1e-5)
            assert float(off["loss_cross"]) == 0.0


@pytest.mark.parametrize("stones", ["sample:1", "every:3"])
def test_dense_epochs_run_every_stone_then_the_cheap_schedule(stones):
    x, y = batch()
    full = make(STONES="all").eval()
    d = make(STONES=stones, DENSE_EPOCHS=2).eval()
    d.load_state_dict(full.state_dict())
    state = d.get_extra_state()
    with torch.no_grad():
        _, ref = full.forward_train(image=x, target=y, epoch=1.5)
        for epoch in (1, 1.5, 2):
            _, got = d.forward_train(image=x, target=y, epoch=epoch)
            for k in ref:
                torch.testing.assert_close(got[k], full.forward_train(image=x, target=y, epoch=epoch)[1][k])
        assert d.get_extra_state() == state  # the draw state waits for the cheap phase
        calls = []
        d.planner.active = lambda module: calls.append(1) or ([0], 3.0)
        d.forward_train(image=x, target=y, epoch=3)
    assert calls == [1]


def test_stone_scale_none_and_uniform_weights():
    d = make(STONES="sample:1", STONE_SCALE="none")
    assert d.planner.active(d)[1] == 1.0
    assert make(STONE_WEIGHTS="uniform").stone_weights == [1.0, 1.0, 1.0]
    assert make().stone_weights == [0.25, 0.5, 1.0]


def test_sample_k_is_unbiased_for_task_and_distill_terms():
    """Exact expectation over every equally likely draw, and a Monte-Carlo check of the draws."""
    for k in (1, 2):
        d = make(STONES=f"sample:{k}", GAMMA=0.0).eval()
        x, y = batch()
        full = make(GAMMA=0.0).eval()
        full.load_state_dict(d.state_dict())
        with torch.no_grad():
            _, ref = full.forward_train(image=x, target=y, epoch=30)
            subsets = list(itertools.combinations(range(3), k))
            total = 0.0
            for sub in subsets:
                d.planner.active = lambda module, sub=sub: (list(sub), 3 / k)
                _, loss = d.forward_train(image=x, target=y, epoch=30)
                total = total + sum(loss.values())
        torch.testing.assert_close(total / len(subsets), sum(ref.values()), rtol=1e-5, atol=1e-5)
    # the sampler draws each stone with probability K/n
    d = make(STONES="sample:1")
    torch.manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        idx, factor = d.planner.active(d)
        assert factor == 3.0
        counts[idx] += 1
    assert torch.allclose(counts / 3000, torch.full((3,), 1 / 3), atol=0.03)
    # stratified: every stone exactly once per cycle of n/K steps, cycles in varying order
    cycles = [tuple(d.planner.active(d)[0][0] for _ in range(3)) for _ in range(50)]
    assert all(sorted(c) == [0, 1, 2] for c in cycles) and len(set(cycles)) > 1
    # the draw position travels with the state_dict (exact resume)
    d.planner.active(d)
    state = d.state_dict()
    e = make(STONES="sample:1")
    e.load_state_dict(state)
    assert [e.planner.active(e) for _ in range(2)] == [d.planner.active(d) for _ in range(2)]
    # K not dividing n: independent uniform draws of distinct stones
    d2 = make(STONES="sample:2")
    for _ in range(20):
        idx, factor = d2.planner.active(d2)
        assert len(set(idx)) == 2 and factor == 1.5


def test_eval_logits_and_exported_student():
    d = make().eval()
    x, _ = batch()
    out = d.eval_logits(x)
    assert sorted(out) == ["stone1", "stone2", "stone3", "teacher"]
    vanilla = build_model("resnet8", num_classes=10)
    assert list(d.student.state_dict()) == list(vanilla.state_dict())
    assert "stone1" in d.describe() or "student block 1" in d.describe()


def test_connectors_resize_both_ways():
    from mdistiller_blockkd.distillers.blockkd import Connector
    down = Connector(StageInfo(8, 1), StageInfo(16, 2))
    up = Connector(StageInfo(8, 4), StageInfo(16, 2), "conv3x3_bn_relu")
    x = torch.randn(2, 8, 16, 16)
    assert down(x).shape == (2, 16, 8, 8)
    assert up(x).shape == (2, 16, 32, 32)
    assert (up(x) >= 0).all()


@pytest.mark.parametrize("teacher,student", UPSTREAM_PAIRS)
def test_every_upstream_pair_takes_a_step(teacher, student):
    d = make(teacher, student, num_classes=100)
    d.train()
    opt = torch.optim.SGD(d.get_learnable_parameters(), lr=0.01, momentum=0.9)
    x, y = batch(4, 100)
    _, loss = d.forward_train(image=x, target=y, epoch=1)
    total = sum(loss.values())
    assert torch.isfinite(total)
    opt.zero_grad()
    total.backward()
    opt.step()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert not d.teacher.training


def test_folded_teacher_computes_the_same_stones():
    x, y = batch()
    out = []
    for fold in (True, False):
        d = make(FOLD=fold).eval()
        randomize_bn(d.teacher, shift=0.1)
        with torch.no_grad():
            out.append(d.forward_stones(x))
        used = d.teacher_model(x)
        assert (used is d.teacher) != fold
        if fold:  # the folded copy has no BatchNorm left and is not part of the state_dict
            assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in used.modules())
            assert all(not k.startswith("_teacher") for k in d.state_dict())
    (sa, za, ta), (sb, zb, tb) = out
    torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-4)
    for a, b in zip(za, zb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cifar_yamls_cover_every_upstream_pair():
    import glob
    import os
    root = os.path.join(os.path.dirname(__file__), "..", "configs", "cifar100", "blockkd")
    pairs = set()
    for path in glob.glob(os.path.join(root, "*.yaml")):
        cfg = load_cfg(path)
        assert cfg.DISTILLER.TYPE == "BLOCKKD" and cfg.SOLVER.EPOCHS == 240 and cfg.SOLVER.WEIGHT_DECAY == 5e-4
        assert cfg.SOLVER.LR == (0.01 if cfg.DISTILLER.STUDENT in ("ShuffleV1", "ShuffleV2", "MobileNetV2") else 0.05)
        pairs.add((cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT))
    assert pairs == set(UPSTREAM_PAIRS)
