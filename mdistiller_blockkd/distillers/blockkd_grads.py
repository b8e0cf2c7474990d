"""Where a Block-KD step's gradient into the student's first blocks comes from (the stone-grads command's numbers).

:func:`stone_gradients` compares, on given batches, the gradient of the loss with respect to
the student's first-block parameters (:func:`first_block_parameters`: its stem and block 1,
where every stone's gradient arrives) for every stone (``g_all``), the student's own terms
only, and each single stone as ``sample:1`` draws it with ``STONE_SCALE`` ``unbiased`` and
``none``: mean gradient norms and the mean relative error ``|g - g_all| / |g_all|`` of each
one-step estimate. Forward passes run in training mode; no weight is updated.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from ..errors import ConfigError
from .blockkd_core import StepPlan

__all__ = ["first_block_parameters", "stone_gradients"]


def first_block_parameters(distiller, image: torch.Tensor) -> List[torch.nn.Parameter]:
    """The student parameters that the stem and first block of its staged view use (found by autograd)."""
    view = distiller.sview
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    out = view.block(0, view.stem(image[:2]))
    grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    params = [p for p, g in zip(params, grads) if g is not None]
    if not params:
        raise ConfigError("the student's staged view has no stem or first-block parameters to measure")
    return params


def stone_gradients(distiller, batches, params, epoch: float = float("inf")) -> Dict[str, object]:
    """The statistics of the module docstring for ``batches`` of ``(image, target)``."""
    n = distiller.num_stones

    def grad(image, target, active, factor):
        s, stones, t = distiller._forward(image, active)
        w = [distiller.stone_weights[k] * factor for k in active]
        cross = w if distiller.opts.loss.weight_cross else [factor] * len(active)
        loss = distiller.loss_terms(s, stones, t, target, StepPlan(active, w, cross), epoch)
        g = torch.autograd.grad(sum(loss.values()), params, allow_unused=True)
        return torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten() for gi, p in zip(g, params)])

    rows = {"all": [], "student_terms_only": [], "sample1_unbiased": [], "sample1_none": []}
    err = {k: [] for k in rows if k != "all"}
    mean_err, per_stone = [], [[] for _ in range(n)]
    distiller.train()
    for image, target in batches:
        g_all = grad(image, target, list(range(n)), 1.0)
        g_own = grad(image, target, [], 1.0)
        g_unb = [grad(image, target, [k], float(n)) for k in range(n)]
        g_none = [grad(image, target, [k], 1.0) for k in range(n)]
        ref = max(g_all.norm().item(), 1e-20)
        rows["all"].append(g_all.norm().item())
        rows["student_terms_only"].append(g_own.norm().item())
        rows["sample1_unbiased"].append(sum(g.norm().item() for g in g_unb) / n)
        rows["sample1_none"].append(sum(g.norm().item() for g in g_none) / n)
        err["student_terms_only"].append((g_own - g_all).norm().item() / ref)
        err["sample1_unbiased"].append(sum((g - g_all).norm().item() for g in g_unb) / n / ref)
        err["sample1_none"].append(sum((g - g_all).norm().item() for g in g_none) / n / ref)
        mean_err.append((torch.stack(g_unb).mean(0) - g_all).norm().item() / ref)
        for k, g in enumerate(g_unb):
            per_stone[k].append((g - g_own).norm().item())

    def avg(v):
        return sum(v) / len(v)

    return {
        "num_stones": n,
        "batches": len(rows["all"]),
        "grad_norm": {k: avg(v) for k, v in rows.items()},
        "relative_error_vs_all": {k: avg(v) for k, v in err.items()},
        "unbiased_mean_error": avg(mean_err),
        "stone_gradient_norm_unbiased": {f"stone{sid}": avg(v) for sid, v in zip(distiller.stone_ids, per_stone)},
    }
