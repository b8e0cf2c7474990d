"""The optimizer and learning-rate schedule of a run: one factory, :func:`build_optimizer`.

``SOLVER.TYPE``
    ``SGD`` (mdistiller's: ``LR``, ``MOMENTUM``, ``WEIGHT_DECAY`` on every parameter) or
    ``AdamW`` (``torch.optim.AdamW`` with torch's betas and eps; ``WEIGHT_DECAY`` on the
    weight matrices only, none on biases and norm weights -- parameters of one
    dimension -- as BERT's fine-tuning and timm do).

``SOLVER.SCHEDULER``
    ``step`` -- mdistiller's schedule, set at the start of every epoch:
    ``LR * LR_DECAY_RATE ** (number of LR_DECAY_STAGES s with epoch > s)`` (the trainer's
    ``learning_rate``; :func:`build_optimizer` returns no scheduler for it, so it stays
    exactly as it was). ``linear`` -- linear warm-up from 0 over ``WARMUP_EPOCHS``, then
    linear decay to 0 at the last step (BERT's fine-tuning schedule). ``cosine`` -- the
    same warm-up, then cosine decay to 0 (ViTs). Both are timm's schedulers
    (``create_scheduler_v2``: ``poly`` of power 1 and ``cosine``, warm-up as a prefix)
    counted in optimizer updates: ``WARMUP_EPOCHS`` may be fractional, it is rounded to
    whole steps.

``SOLVER.CLIP_GRAD_NORM``
    > 0: the global L2 norm of the gradients is clipped to it before every update
    (:func:`clip_gradients`, which unscales fp16 gradients first); 0: no clipping.

A training step with the returned :class:`Optim` ``o`` (``global_step`` counts updates
from 1)::

    o.optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    clip_gradients(o.optimizer, scaler, o.clip_grad_norm)
    scaler.step(o.optimizer); scaler.update()
    if o.scheduler is not None:
        o.scheduler.step_update(global_step)   # the lr of the next update

The timm schedulers are functions of the update count (their ``state_dict`` holds no
progress), and the optimizer's state dict keeps each group's current ``lr``: a run
resumed after epoch *k* continues with exactly the learning rates of an uninterrupted run.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["OPTIMIZERS", "SCHEDULERS", "Optim", "build_optimizer", "clip_gradients"]

#: ``SOLVER.TYPE`` values (case-insensitive).
OPTIMIZERS = ("SGD", "AdamW")
#: ``SOLVER.SCHEDULER`` values.
SCHEDULERS = ("step", "linear", "cosine")


class Optim(NamedTuple):
    """What :func:`build_optimizer` returns.

    ``scheduler`` is a timm scheduler stepped after every update (``step_update``), or
    ``None`` for ``SOLVER.SCHEDULER step`` (the trainer sets the lr per epoch);
    ``clip_grad_norm`` is ``SOLVER.CLIP_GRAD_NORM`` (0: no clipping).
    """

    optimizer: torch.optim.Optimizer
    scheduler: Optional[object]
    clip_grad_norm: float


def build_optimizer(cfg, params: Iterable[nn.Parameter], steps_per_epoch: int) -> Optim:
    """The optimizer, scheduler and clipping of ``cfg.SOLVER`` for ``params`` (see the module docstring).

    ``steps_per_epoch``: optimizer updates per epoch (the training loader's length), used
    by the ``linear`` and ``cosine`` schedules. Raises :class:`ConfigError` for a bad value.
    """
    params = list(params)
    s = cfg.SOLVER
    kind = str(s.TYPE).strip().lower()
    lr, decay = float(s.LR), float(s.WEIGHT_DECAY)
    if kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=float(s.MOMENTUM), weight_decay=decay)
    elif kind == "adamw":
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=decay)
    else:
        raise ConfigError(f"SOLVER.TYPE is '{s.TYPE}'; use one of {', '.join(OPTIMIZERS)}")
    name = str(s.SCHEDULER).strip().lower()
    if name not in SCHEDULERS:
        raise ConfigError(f"SOLVER.SCHEDULER is '{s.SCHEDULER}'; use one of {', '.join(SCHEDULERS)}")
    scheduler = None
    if name != "step":
        if int(steps_per_epoch) < 1:
            raise ConfigError(f"the {name} schedule needs at least one step per epoch, got {steps_per_epoch}")
        from timm.scheduler import create_scheduler_v2

        total = int(s.EPOCHS) * int(steps_per_epoch)
        warm = int(round(float(s.WARMUP_EPOCHS) * int(steps_per_epoch)))
        if warm >= total:
            raise ConfigError(f"SOLVER.WARMUP_EPOCHS is {s.WARMUP_EPOCHS}: {warm} warm-up steps of {total}; the "
                              "warm-up must end before the last epoch")
        # counted in updates: one "epoch" of timm's factory is one update here
        scheduler, _ = create_scheduler_v2(
            optimizer, sched="poly" if name == "linear" else "cosine", num_epochs=total - warm, decay_rate=1.0,
            min_lr=0.0, warmup_lr=0.0, warmup_epochs=warm, warmup_prefix=True, step_on_epochs=False,
            updates_per_epoch=1)
    return Optim(optimizer, scheduler, float(s.CLIP_GRAD_NORM))


def clip_gradients(optimizer: torch.optim.Optimizer, scaler, max_norm: float) -> Optional[torch.Tensor]:
    """Clip the gradients of ``optimizer``'s parameters to global L2 norm ``max_norm`` (no-op when ``max_norm <= 0``).

    ``scaler`` (``torch.amp.GradScaler``, enabled or not) unscales fp16 gradients first;
    its ``step`` then does not unscale them again. Returns the norm before clipping.
    """
    if max_norm <= 0:
        return None
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def train_step(model, optim: Optim, scaler, image, target, epoch, autocast) -> tuple:
    """One training step, the same in the trainer and the benchmark.

    ``model(image=, target=, epoch=)`` under ``autocast`` (a context manager), the mean of
    each returned loss term, their sum; ``zero_grad``, backward (scaled for fp16), gradient
    clipping, the optimizer step and the scaler's update. Returns ``(preds, loss, terms)``
    (the scheduler, stepped per update, is the caller's: it needs the global step).
    Each part runs in a ``record_function`` scope (``part:forward`` / ``part:backward`` /
    ``part:optimizer``) that the benchmark's step profile reads.
    """
    from torch.autograd.profiler import record_function

    with record_function("part:forward"), autocast:
        preds, losses = model(image=image, target=target, epoch=epoch)
    terms = {k: v.float().mean() for k, v in losses.items()}
    loss = sum(terms.values())
    optim.optimizer.zero_grad(set_to_none=True)
    with record_function("part:backward"):
        scaler.scale(loss).backward()
    with record_function("part:optimizer"):
        clip_gradients(optim.optimizer, scaler, optim.clip_grad_norm)
        scaler.step(optim.optimizer)
        scaler.update()
    return preds, loss, terms
