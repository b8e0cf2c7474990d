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
caller keeps the unfolded model.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn

from .staged import StagedModel


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


def _same(ref, outs, rtol: float) -> bool:
    return all(a.shape == b.shape and (a - b).abs().max().item() <= rtol * max(1.0, a.abs().max().item())
               for a, b in zip(ref, outs))


@torch.no_grad()
def fold_frozen_bn(model: StagedModel, probe: torch.Tensor, rtol: float = 1e-4) -> Optional[StagedModel]:
    """Return an eval-mode copy of ``model`` with conv->BN pairs folded, or ``None``.

    ``probe`` is a small input batch on the model's device. Folds are kept only if the
    staged outputs (stem, every block, logits) on ``probe`` stay within ``rtol``
    (relative to each output's largest magnitude); a pair whose conv output is also used
    elsewhere (e.g. by a residual add) fails that check and stays unfolded. All pairs are
    tried at once first, then halves of a failing group (bisection), so a model with no
    such pair costs one check. A model without BatchNorm2d (transformers) returns ``None``
    without running the probe.
    The copy shares nothing with ``model``; its parameters do not require gradients.
    """
    model = model.eval()
    if not any(type(m) is nn.BatchNorm2d for m in model.modules()):
        return None  # nothing to fold, and no probe run (a text model's probe is not an image batch)
    pairs = _conv_bn_pairs(model, probe)
    if not pairs:
        return None
    folded = copy.deepcopy(model).eval().requires_grad_(False)
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
        conv.bias = bias
        setattr(owner, attr, bn)

    kept = []

    def search(group):
        """Keep the largest sub-groups whose folding leaves the outputs unchanged (bisection)."""
        undos = [apply(p) for p in group]
        if _same(ref, _outputs(folded, probe), rtol):
            kept.extend(group)
            return
        for u in reversed(undos):
            revert(u)
        if len(group) > 1:
            search(group[: len(group) // 2])
            search(group[len(group) // 2:])

    try:
        ref = _outputs(model, probe)
        search(pairs)
    except Exception as e:  # a model whose code reads a folded BN's attributes directly
        warnings.warn(f"BatchNorm folding skipped for {type(model).__name__}: {e}")
        return None
    return folded if kept else None
