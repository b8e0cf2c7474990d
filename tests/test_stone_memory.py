"""What the stones keep for backward: BLOCKKD.SAVE_MASKS and BLOCKKD.RECOMPUTE change memory, never the numbers.

Each option is compared with the stones keeping every activation (``SAVE_MASKS False``,
``RECOMPUTE False``): the loss and every gradient (student and connectors) must be the
same, and the bytes the stones save for backward (the benchmark's own count,
:func:`~mdistiller_blockkd.bench.profile.saved_tensor_bytes`) must drop.
"""

import pytest
import torch

from mdistiller_blockkd.bench.profile import saved_tensor_bytes
from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.distillers.blockkd_core import BlockKDOptions
from mdistiller_blockkd.errors import ConfigError

from test_blockkd import batch, make

pytestmark = pytest.mark.usefixtures("one_thread")

KEEP_ALL = dict(SAVE_MASKS=False)
OPTIONS = {"masks": dict(SAVE_MASKS=True), "recompute": dict(RECOMPUTE=True)}


def step(d, x, y, amp):
    """One forward and backward; the loss, every learnable parameter's gradient and the stones' saved bytes."""
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        _, terms = d.forward_train(image=x, target=y, epoch=240)
        loss = sum(terms.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.requires_grad and p.grad is not None}

    def forward():
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            return d.forward_train(image=x, target=y, epoch=240)
    saved = saved_tensor_bytes(forward, d, d.teacher_model(x)).get("stones", {}).get("bytes", 0)
    return loss.detach(), grads, saved


def compare(teacher, student, stones, amp, options, n=8, **extra):
    x, y = batch(n)
    want = step(make(teacher, student, STONES=stones, **KEEP_ALL, **extra).train(), x, y, amp)
    got = step(make(teacher, student, STONES=stones, **options, **extra).train(), x, y, amp)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert set(got[1]) == set(want[1]) and any(n.startswith("connectors.") for n in want[1])
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-6, msg=name)
    return want[2], got[2]


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stones", ["all", "last:2", "sample:1"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_loss_and_gradients_are_the_same_and_the_stones_keep_less(option, stones, amp):
    before, after = compare("resnet20", "resnet8", stones, amp, OPTIONS[option])
    if stones == "sample:1":
        return  # its count is of the next draw's stone, which may be the deepest: the teacher's head saves ~nothing
    assert before > 0
    if option == "recompute":
        assert after == 0  # only the stones' inputs are kept (by the checkpoint, outside the teacher)
    else:  # bit masks for float32 (bf16) activations; bf16 also keeps the weights cast for the step
        assert after <= (before / 16 if amp is None else 0.8 * before)


@pytest.mark.parametrize("teacher,student", [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2")])
def test_masks_through_pooling_and_unfolded_batchnorm(teacher, student):
    """VGG: max-pooling saves ReLU outputs; WRN (pre-activation): BatchNorm stays unfolded and keeps its input."""
    before, after = compare(teacher, student, "all", None, OPTIONS["masks"], n=2)
    assert after < 0.75 * before


def test_batched_stones_recompute_and_masks():
    for options in OPTIONS.values():
        before, after = compare("resnet20", "resnet8", "all", None, options, BATCH_STONES="on")
        assert after < before


def test_the_options_are_flags():
    node = load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD"]).BLOCKKD
    opts = BlockKDOptions.from_node(node)
    assert opts.recompute is False and opts.save_masks is False
    for key in ("RECOMPUTE", "SAVE_MASKS"):
        bad = node.clone()
        bad.defrost()
        bad[key] = "yes"
        with pytest.raises(ConfigError, match=f"BLOCKKD.{key} is 'yes'; use False .* or True|BLOCKKD.{key} is 'yes'; use True"):
            BlockKDOptions.from_node(bad)
    with pytest.raises(ConfigError, match="RECOMPUTE"):
        load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.RECOMPUTE", "maybe"])
