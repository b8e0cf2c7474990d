"""Checks that need a CUDA GPU (``pytest -m cuda``; skipped elsewhere). ``tools/gpu_check.sh`` runs them."""

import pytest
import torch
from torch import nn

from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.distillers import distiller_dict
from mdistiller_blockkd.engine.trainer import _bf16_note
from mdistiller_blockkd.models import build_model
from mdistiller_blockkd.models.fold import exact_fp32
from mdistiller_blockkd.utils.checkpoint import save_checkpoint
from mdistiller_blockkd.utils.misc import set_deterministic

from helpers import randomize_bn

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def blockkd(stones="all", **opts):
    torch.manual_seed(0)
    cfg = load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.WARMUP", 0, "BLOCKKD.STONES", stones]
                   + [x for kv in opts.items() for x in kv])
    teacher = build_model("resnet20", num_classes=10)
    randomize_bn(teacher)
    return distiller_dict["BLOCKKD"](build_model("resnet8", num_classes=10), teacher, cfg).cuda()


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g).cuda(), (torch.arange(n) % 10).cuda()


def tf32_settings():
    b = torch.backends
    conv = getattr(b.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision, b.cuda.matmul.fp32_precision
    return b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32


def test_teacher_folds_under_the_default_tf32_settings():
    before = tf32_settings()
    d = blockkd().train()
    x, y = batch()
    d(image=x, target=y, epoch=1)
    assert d.teacher_folded is True
    assert tf32_settings() == before
    with torch.no_grad(), exact_fp32():
        torch.testing.assert_close(d.teacher_model(x)(x)[0], d.teacher(x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_blockkd_step_under_autocast(amp):
    d = blockkd().train()
    x, y = batch()
    opt = torch.optim.SGD(d.get_learnable_parameters(), lr=0.01)
    with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
        _, losses = d(image=x, target=y, epoch=1)
    loss = sum(v.float() for v in losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert d.teacher_folded is True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("stones", ["all", "sample:1", "every:2"])
def test_dataparallel_on_two_gpus(stones):
    d = blockkd(stones).train()
    dp = nn.DataParallel(d)
    x, y = batch()
    for _ in range(2):
        _, losses = dp(image=x, target=y, epoch=1)
        sum(v.mean() for v in losses.values()).backward()
    assert d.teacher_folded is True and d.student.get_classifier().weight.grad is not None


def test_checkpoint_of_a_cuda_state_loads_without_map_location(tmp_path):
    d = blockkd()
    opt = torch.optim.SGD(d.get_learnable_parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    sum(d.train()(image=x, target=y, epoch=1)[1].values()).backward()
    opt.step()
    path = str(tmp_path / "latest")
    save_checkpoint({"model": d.state_dict(), "optimizer": opt.state_dict(), "cuda_rng": torch.cuda.get_rng_state()},
                    path)
    state = torch.load(path, weights_only=True)  # no map_location
    devices = {v.device.type for v in state["model"].values() if torch.is_tensor(v)}
    devices |= {t.device.type for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t)}
    assert devices == {"cpu"}


def test_deterministic_steps_are_bit_identical():
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    set_deterministic(True)
    try:
        grads = []
        for _ in range(2):
            d = blockkd().train()  # seeded: the same weights each time
            x, y = batch(32)
            sum(d(image=x, target=y, epoch=1)[1].values()).backward()
            grads.append([p.grad for p in d.get_learnable_parameters() if p.grad is not None])
        assert len(grads[0]) == len(grads[1]) > 0 and all(torch.equal(a, b) for a, b in zip(*grads))
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[:2]
        torch.use_deterministic_algorithms(flags[2])


def test_bf16_is_native_here_or_warned():
    cap = torch.cuda.get_device_capability()
    note = _bf16_note("bf16", torch.device("cuda", 0))
    assert (note is None) == (cap[0] >= 8)
