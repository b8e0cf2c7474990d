"""Fold a frozen model's BatchNorm layers into the convolutions that feed them.

A frozen teacher runs BatchNorm in eval mode, where BN is a fixed per-channel affine
map ``y = (x - mean) / sqrt(var + eps) * weight + bias``. When ``x`` is the output of a
convolution used by nothing else, that map folds exactly into the convolution's weight
and bias, which removes the BN from both the forward and the input-gradient backward
(Block-KD back-propagates through teacher blocks into the student; BN backward is a
large share of that cost on CPU).

:func:`fold_frozen_bn` works on any model without architecture tables: it records the
order of Conv2d / BatchNorm2d calls on a probe batch, and folds each BN whose input *is*
the tensor the conv just produced, keeping a fold only if every output of the staged
view on the probe batch is unchanged. With nothing folded it returns ``None`` and the
caller keeps the unfolded model; :func:`try_fold_frozen_bn` also says why.

The check runs in full fp32 precision (:func:`exact_fp32`: no TF32 in convolutions and
matrix products, the settings restored after). On Ampere and newer GPUs torch computes
fp32 convolutions in TF32 by default, whose rounding (about 1e-3) would fail the check
and leave every teacher unfolded; the folded copy itself then runs with the user's settings.
It only reads the model given, so it is safe on a DataParallel replica: the probe's
forward hooks go on the copy, not on modules whose hook tables the replicas share.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional, Tuple

import torch
from torch import nn

from .staged import StagedModel


@contextlib.contextmanager
def exact_fp32():
    """Convolutions and matrix products in full fp32 (no TF32) inside the block; the previous
    settings are restored after. Uses torch's ``fp32_precision`` switches where they exist
    (torch >= 2.9; mixing them with the legacy ``allow_tf32`` flags is an error there), else
    the ``allow_tf32`` flags."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        switches, exact = [(conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")], "ieee"
    else:
        switches, exact = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")], False
    saved = [getattr(obj, name) for obj, name in switches]
    try:
        for obj, name in switches:
            setattr(obj, name, exact)
        yield
    finally:
        for (obj, name), value in zip(switches, saved):
            setattr(obj, name, value)


def _conv_bn_pairs(model: nn.Module, probe: torch.Tensor):
    calls = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: calls.append((m, i[0], o)))
        for m in model.modules()
        if isinstance(m, nn.Conv2d) or type(m) is nn.BatchNorm2d
    ]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    names = {id(m): n for n, m in model.named_modules()}
    used_as_input = {}
    for m, i, _ in calls:
        used_as_input[id(i)] = used_as_input.get(id(i), 0) + 1
    pairs = []
    for (a, _, out_a), (b, in_b, _) in zip(calls, calls[1:]):
        if isinstance(a, nn.Conv2d) and type(b) is nn.BatchNorm2d and in_b is out_a and used_as_input[id(out_a)] == 1:
            pairs.append((names[id(a)], names[id(b)]))
    return sorted(set(pairs))


def _outputs(model: StagedModel, probe: torch.Tensor):
    view = model.staged_view()
    h = view.stem(probe)
    outs = [h]
    for i in range(view.num_blocks):
        h = view.block(i, h)
        outs.append(h)
    outs.append(view.head(h))
    return outs


def _difference(ref, outs) -> float:
    """The largest change of any output, relative to that output's largest magnitude (at least 1)."""
    worst = 0.0
    for a, b in zip(ref, outs):
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, (a - b).abs().max().item() / max(1.0, a.abs().max().item()))
    return worst


@torch.no_grad()
def fold_frozen_bn(model: StagedModel, probe: torch.Tensor, rtol: float = 1e-4) -> Optional[StagedModel]:
    """Return an eval-mode copy of ``model`` with conv->BN pairs folded, or ``None``.

    ``probe`` is a small input batch on the model's device. Folds are kept only if the
    staged outputs (stem, every block, logits) on ``probe`` stay within ``rtol``
    (relative to each output's largest magnitude), computed in full fp32
    (:func:`exact_fp32`); a pair whose conv output is also used elsewhere (e.g. by a
    residual add) fails that check and stays unfolded. All pairs are tried at once first,
    then halves of a failing group (bisection), so a model with no such pair costs one
    check. A model without BatchNorm2d (transformers) returns ``None`` without running
    the probe. The copy shares nothing with ``model``; its parameters do not require gradients.
    """
    return try_fold_frozen_bn(model, probe, rtol)[0]


@torch.no_grad()
def try_fold_frozen_bn(model: StagedModel, probe: torch.Tensor, rtol: float = 1e-4) -> Tuple[Optional[StagedModel], str]:
    """:func:`fold_frozen_bn`, and one line saying what it did.

    The line is ``""`` when ``model`` has no conv->BN pair (nothing to fold), else how many
    pairs were folded, or why none was: every fold changed the outputs beyond ``rtol`` (the
    difference is given), or the model's code failed on the folded copy.
    """
    model.eval()
    if not any(type(m) is nn.BatchNorm2d for m in model.modules()):
        return None, ""  # nothing to fold, and no probe run (a text model's probe is not an image batch)
    try:
        folded = copy.deepcopy(model).eval().requires_grad_(False)
        with exact_fp32():
            pairs = _conv_bn_pairs(folded, probe)
            if not pairs:
                return None, ""
            kept, first = _fold_pairs(folded, pairs, _outputs(model, probe), probe, rtol)
    except Exception as e:  # a model whose code reads a folded BN's attributes directly
        return None, f"folding failed on {type(model).__name__}: {type(e).__name__}: {e}"
    if not kept:
        return None, (f"none of its {len(pairs)} conv->BN pairs folds exactly: folding them changed the outputs by "
                      f"up to {first:.2g} (relative; the limit is {rtol:g})")
    return folded, f"{len(kept)} of {len(pairs)} conv->BN pairs folded"


def _fold_pairs(folded: StagedModel, pairs, ref, probe: torch.Tensor, rtol: float):
    """Fold the largest groups of ``pairs`` that keep ``folded``'s outputs within ``rtol`` of ``ref``
    (bisection); return the folded pairs and the difference of folding them all at once."""
    mods = dict(folded.named_modules())

    def apply(pair):
        conv_name, bn_name = pair
        conv, bn = mods[conv_name], mods[bn_name]
        parent, _, attr = bn_name.rpartition(".")
        owner = mods[parent] if parent else folded
        undo = (conv, conv.weight.detach().clone(), conv.bias, owner, attr, bn)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.copy_(conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
        setattr(owner, attr, nn.Identity())
        return undo

    def revert(undo):
        conv, weight, bias, owner, attr, bn = undo
        conv.weight.copy_(weight)
        if not (bias is None or isinstance(bias, nn.Parameter)):
            del conv.bias  # a DataParallel replica holds its bias as a plain tensor attribute
        conv.bias = bias
        setattr(owner, attr, bn)

    kept, differences = [], []

    def search(group):
        undos = [apply(p) for p in group]
        differences.append(_difference(ref, _outputs(folded, probe)))
        if differences[-1] <= rtol:
            kept.extend(group)
            return
        for u in reversed(undos):
            revert(u)
        if len(group) > 1:
            search(group[: len(group) // 2])
            search(group[len(group) // 2:])

    search(pairs)
    return kept, differences[0]
