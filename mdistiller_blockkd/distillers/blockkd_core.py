"""The one Block-KD core that every Block-KD composes: options, the stone planner and the loss.

* :class:`LossOptions` / :class:`BlockKDOptions` -- ``CFG.BLOCKKD`` read and validated once;
* :class:`StonePlanner` -- which stones run on a step and with what factors (``STONES``,
  ``STONE_SCALE``, ``STONE_WEIGHTS``, ``DENSE_EPOCHS``), and the draw state it advances;
* :func:`blockkd_loss` -- a pure function: student, stone and teacher logits -> loss terms.

The classification :class:`~.blockkd.BlockKD`, the detection Block-KD, torchdistill's
``BlockKDStudent`` / ``BlockKDLoss`` and the transformer stones each build their own
stones and call these; none copies another's methods. See ``docs/blockkd.md``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from . import losses

__all__ = ["CNN_CONNECTORS", "TOKEN_CONNECTORS", "CONNECTORS", "LOGIT_LOSSES", "STONE_MODES", "LossOptions", "BlockKDOptions", "StepPlan", "StonePlanner",
           "parse_stones", "pair_list", "distance", "blockkd_loss", "stone_pass"]

CNN_CONNECTORS = ("conv1x1_bn", "conv3x3_bn", "conv1x1_bn_relu", "conv3x3_bn_relu")
TOKEN_CONNECTORS = ("linear", "linear_ln")  # transformer pairs
CONNECTORS = CNN_CONNECTORS + TOKEN_CONNECTORS
LOGIT_LOSSES = ("kd", "dkd", "lskd")
STONE_MODES = ("all", "last", "sample", "every")
STONE_SCALES = ("unbiased", "none")
STONE_WEIGHTS = ("halving", "uniform")


def _choice(node: str, key: str, value, valid) -> str:
    v = str(value).strip().lower()
    if v not in valid:
        raise ConfigError(f"{node}.{key} is '{value}'; use one of {', '.join(valid)}")
    return v


def _number(where: str, value, low: float, hint: str, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} is {value!r}; {hint}") from None
    if not (math.isfinite(v) and v >= low) or (positive and v == 0):
        raise ConfigError(f"{where} is {value}; {hint}")
    return v


def _flag(where: str, value, hint: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} is {value!r}; {hint}")
    return value


_T_HINT = "it must be a finite number > 0 (the temperature: 4 on CIFAR-style data, 1 on ImageNet)"
_WARMUP_HINT = "it must be a finite number >= 0 (epochs of warm-up; 0: none)"
_WEIGHT_HINT = "it must be a finite number >= 0 (a loss weight)"


def _loss_field(name: str, value, where: str):
    """One :class:`LossOptions` field checked and converted; errors name ``where`` (``BLOCKKD.T``)."""
    if name == "T":
        return _number(where, value, 0.0, _T_HINT, positive=True)
    if name == "warmup":
        return _number(where, value, 0.0, _WARMUP_HINT)
    if name == "logit_loss":
        v = str(value).strip().lower()
        if v not in LOGIT_LOSSES:
            raise ConfigError(f"{where} is '{value}'; use one of {', '.join(LOGIT_LOSSES)}")
        return v
    if name in ("detach_ensemble", "weight_cross"):
        return bool(value)
    return _number(where, value, 0.0, _WEIGHT_HINT)


@dataclass(frozen=True)
class LossOptions:
    """The loss's options (``BLOCKKD.ALPHA``... ``WEIGHT_CROSS``), validated."""

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    T: float = 4.0
    warmup: float = 20.0
    logit_loss: str = "kd"
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    detach_ensemble: bool = False
    weight_cross: bool = True

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _loss_field(f.name, getattr(self, f.name), f"BLOCKKD.{f.name.upper()}"))

    @classmethod
    def from_node(cls, c, source: str = "", names=None, **overrides) -> "LossOptions":
        """From a ``CFG.BLOCKKD`` node; ``overrides`` (field names, ``None`` = keep) replace its values.

        An override is checked first, its error naming ``source`` and its name in ``names``
        (``BlockKDLoss temperature``), so a wrapper's user reads the keyword they wrote.
        """
        base = dict(alpha=c.ALPHA, beta=c.BETA, gamma=c.GAMMA, T=c.T, warmup=c.WARMUP, logit_loss=c.LOGIT_LOSS,
                    dkd_alpha=c.DKD_ALPHA, dkd_beta=c.DKD_BETA, detach_ensemble=c.DETACH_ENSEMBLE,
                    weight_cross=c.WEIGHT_CROSS)
        for k, v in overrides.items():
            if v is not None:
                base[k] = _loss_field(k, v, f"{source} {(names or {}).get(k, k)}".strip())
        return cls(**base)


@dataclass(frozen=True)
class BlockKDOptions:
    """Every ``CFG.BLOCKKD`` option, read and validated once (:meth:`from_node`)."""

    loss: LossOptions
    stones: str = "all"
    stone_scale: str = "unbiased"
    stone_weights: str = "halving"
    dense_epochs: float = 0.0
    connector: str = "conv1x1_bn"
    batch_stones: str = "auto"
    pairs: Tuple[Tuple[int, int], ...] = ()
    recompute: bool = False
    save_masks: bool = False

    @classmethod
    def from_node(cls, c) -> "BlockKDOptions":
        """From a ``CFG.BLOCKKD`` node; raises one :class:`ConfigError` naming the first bad value."""
        opts = cls(
            loss=LossOptions.from_node(c),
            stones=str(c.STONES).strip().lower(),
            stone_scale=_choice("BLOCKKD", "STONE_SCALE", c.STONE_SCALE, STONE_SCALES),
            stone_weights=_choice("BLOCKKD", "STONE_WEIGHTS", c.STONE_WEIGHTS, STONE_WEIGHTS),
            dense_epochs=_number("BLOCKKD.DENSE_EPOCHS", c.DENSE_EPOCHS, 0.0,
                                 "use 0 (the STONES schedule from the start) or a positive number of epochs with every stone"),
            connector=_choice("BLOCKKD", "CONNECTOR", c.CONNECTOR, CONNECTORS),
            batch_stones=_choice("BLOCKKD", "BATCH_STONES", c.BATCH_STONES, ("auto", "on", "off")),
            pairs=tuple(pair_list(c.PAIRS)),
            recompute=_flag("BLOCKKD.RECOMPUTE", c.RECOMPUTE,
                            "use False (the stones keep what their backward needs) or True (they recompute it in backward)"),
            save_masks=_flag("BLOCKKD.SAVE_MASKS", c.SAVE_MASKS,
                             "use True (the stones keep bit masks where backward needs only an activation's sign) "
                             "or False (they keep the activations)"),
        )
        parse_stones(opts.stones, None)
        return opts



def pair_list(explicit) -> List[Tuple[int, int]]:
    """``BLOCKKD.PAIRS`` as 1-based ``(student_block, teacher_block)`` tuples, or a ConfigError."""
    hint = "use [] (automatic) or a list of [student_block, teacher_block] pairs of 1-based integers, e.g. [[1, 1], [2, 2]]"
    if not isinstance(explicit, (list, tuple)):
        raise ConfigError(f"BLOCKKD.PAIRS is {explicit!r}; {hint}")
    out = []
    for p in explicit:
        ok = isinstance(p, (list, tuple)) and len(p) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in p)
        if not ok:
            raise ConfigError(f"BLOCKKD.PAIRS entry {p!r} (in {list(explicit)!r}) is not a pair of integers; {hint}")
        out.append((int(p[0]), int(p[1])))
    return out


def parse_stones(spec: str, n) -> Tuple[str, int]:
    """``all`` | ``last:K`` | ``sample:K`` | ``every:K`` -> (mode, K).

    ``n`` is the number of stones of the pair (``K <= n`` for ``last`` and ``sample``);
    ``None`` checks the form only. ``every:K`` takes any ``K >= 1``.
    """
    spec = str(spec).strip().lower()
    if spec == "all":
        return "all", n or 0
    mode, _, k = spec.partition(":")
    limit = n if mode in ("last", "sample") and n is not None else None
    if mode in STONE_MODES[1:] and k.isdigit() and int(k) >= 1 and (limit is None or int(k) <= limit):
        return mode, int(k)
    bound = f"1 <= K <= {n} (stones of this pair)" if n is not None else "K >= 1"
    raise ConfigError(f"BLOCKKD.STONES is '{spec}'; use all, last:K, sample:K (K stones a step) or every:K "
                      f"(all stones every K-th step) with {bound}")


class StepPlan(NamedTuple):
    """One step's stones (indices into the existing stones) and the factors on their terms."""

    active: List[int]
    weights: List[float]  # each active stone's task and distill terms
    cross_weights: List[float]  # each active stone's cross term
    student_cross: float = 1.0  # the student's own cross term


class StonePlanner:
    """Which of ``n`` stones exist (``last:K``) and which run on each step, with what factors.

    ``sample:K`` draws K stones per step (walking a random permutation when K divides n);
    ``every:K`` runs every stone on one step in K; ``STONE_SCALE unbiased`` scales the
    stones' terms so the expected loss equals ``all``'s; ``DENSE_EPOCHS`` N runs every stone
    while ``epoch <= N``. The draw state (the walk, the step count) is this object's, so a
    distiller's DataParallel replicas (which share plain attributes) share it; a step's
    draw is made once for all replicas (``SharedState.once_per_step``).
    """

    def __init__(self, opts: BlockKDOptions, n: int):
        self.mode, self.k = parse_stones(opts.stones, n)
        uniform = opts.stone_weights == "uniform"
        weights = [1.0 if uniform else 1.0 / 2 ** (n - 1 - k) for k in range(n)]
        #: indices (among all ``n``) of the stones that exist: ``last:K`` builds only the K deepest
        self.keep = list(range(n - self.k, n) if self.mode == "last" else range(n))
        #: 1-based numbers of the stones among all of the pair's (``stone<id>`` in logs)
        self.stone_ids = [k + 1 for k in self.keep]
        self.stone_weights = [weights[k] for k in self.keep]
        self.unbiased = opts.stone_scale == "unbiased"
        self.dense_epochs = opts.dense_epochs
        self.weight_cross = opts.loss.weight_cross
        self.deck: List[int] = []
        self.pos = 0
        self.step = 0

    @property
    def num_stones(self) -> int:
        return len(self.keep)

    @property
    def has_unused_parameters(self) -> bool:
        """Whether some connectors get no gradient on some steps (DDP needs ``find_unused_parameters``)."""
        return self.mode in ("sample", "every")

    def _count_step(self) -> int:
        step, self.step = self.step, self.step + 1
        return step

    def _draw(self) -> List[int]:
        n = self.num_stones
        if n % self.k:
            return sorted(torch.randperm(n)[: self.k].tolist())
        if self.pos == 0:  # stratified: every stone once per n/K steps
            self.deck = torch.randperm(n).tolist()
        idx = self.deck[self.pos: self.pos + self.k]
        self.pos = (self.pos + self.k) % n
        return sorted(idx)

    def active(self, module) -> Tuple[List[int], float]:
        """This step's stones and the factor on their terms; advances the draw state once per step of ``module``
        (a distiller with a ``SharedState``: its DataParallel replicas share the step's draw)."""
        n = self.num_stones
        if self.mode in ("all", "last"):
            return list(range(n)), 1.0
        if self.mode == "every":
            if module._shared.once_per_step(module, self._count_step) % self.k:
                return [], 1.0
            return list(range(n)), float(self.k) if self.unbiased else 1.0
        return module._shared.once_per_step(module, self._draw), n / self.k if self.unbiased else 1.0

    def plan(self, module, epoch: float = math.inf) -> StepPlan:
        """This step's :class:`StepPlan` (``DENSE_EPOCHS``: every stone while ``epoch <= N``, the draw untouched)."""
        if self.mode in ("sample", "every") and epoch <= self.dense_epochs:
            active, factor = list(range(self.num_stones)), 1.0
        else:
            active, factor = self.active(module)
        weights = [self.stone_weights[k] * factor for k in active]
        cross = weights if self.weight_cross else [factor] * len(active)
        return StepPlan(active, weights, cross, factor if self.mode == "every" else 1.0)

    def state_dict(self) -> dict:
        return {"deck": list(self.deck), "pos": int(self.pos), "step": int(self.step)}

    def load_state_dict(self, state: dict) -> None:
        self.deck, self.pos = [int(v) for v in state.get("deck", [])], int(state.get("pos", 0))
        self.step = int(state.get("step", 0))



#: Functions whose backward, with every argument but the first frozen, uses a saved activation only
#: through its sign (the ReLU: its own output) or not at all (convolution and linear: only for the
#: weight's gradient; pooling: its shape and indices).
_SIGN_ONLY = (torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu, F.relu_, torch.conv2d, F.linear,
              F.adaptive_avg_pool2d, F.max_pool2d)


_BITS = 8


class _Mask(NamedTuple):
    """Where an activation is > 0, one bit per entry (:func:`_pack_bits`), and how to give it back."""

    bits: object  # uint8 tensor (as an outer pack hook keeps it)
    shape: torch.Size
    dtype: torch.dtype
    memory_format: torch.memory_format


def _pack_bits(positive: Tensor) -> Tensor:
    """A bool tensor as uint8, eight entries (in ``reshape(-1)`` order) a byte."""
    flat = positive.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % _BITS))
    shifts = torch.arange(_BITS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, _BITS) << shifts).sum(1, dtype=torch.uint8)


def _unpack_bits(mask: _Mask, bits: Tensor) -> Tensor:
    shifts = torch.arange(_BITS, dtype=torch.uint8, device=bits.device)
    flat = ((bits.unsqueeze(1) >> shifts) & 1).view(-1)[: mask.shape.numel()]
    return flat.to(mask.dtype).view(mask.shape).contiguous(memory_format=mask.memory_format)


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _SignMasks(TorchFunctionMode):
    """While active, activations saved for backward by :data:`_SIGN_ONLY` functions are kept as bit masks.

    An activation (a floating tensor that requires gradients) saved by one of these functions,
    called with no other tensor argument requiring gradients, is replaced by the mask of its
    positive entries, one bit per entry and one mask per tensor however often it is saved (1/32
    of its float32 bytes, 1/16 of bf16). Backward gets it back as 0/1 values of its dtype and
    memory format: the ReLU's gradient needs only
    that sign, a frozen convolution's or linear layer's input gradient only its weight, pooling only
    its shape, so the input gradients are the same. Every other saved tensor is kept as it is, and
    hooks active outside (a saved-tensor count) get what this one keeps.
    """

    def __init__(self):
        super().__init__()
        self.sign_only = False
        self.masks: Dict[int, tuple] = {}  # id(tensor) -> (weak reference, its _Mask)
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.outer_pack, self.outer_unpack = outer if outer is not None else (None, None)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.sign_only = func in _SIGN_ONLY and not any(
            isinstance(a, Tensor) and a.requires_grad for a in (*args[1:], *kwargs.values()))
        try:
            return func(*args, **kwargs)
        finally:
            self.sign_only = False

    def _pack(self, t: Tensor):
        if not (self.sign_only and t.requires_grad and t.is_floating_point()):
            return t if self.outer_pack is None else self.outer_pack(t)
        known = self.masks.get(id(t))
        if known is not None and known[0]() is t:
            return known[1]
        bits = _pack_bits(t > 0)
        mask = _Mask(bits if self.outer_pack is None else self.outer_pack(bits), t.shape, t.dtype, _memory_format(t))
        self.masks[id(t)] = (weakref.ref(t), mask)
        return mask

    def _unpack(self, packed):
        kept = packed.bits if isinstance(packed, _Mask) else packed
        if self.outer_unpack is not None:
            kept = self.outer_unpack(kept)
        return _unpack_bits(packed, kept) if isinstance(packed, _Mask) else kept

    def __enter__(self):
        self.hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.hooks.__exit__(*exc)


def stone_pass(fn: Callable[..., object], *inputs, opts: "BlockKDOptions"):
    """``fn(*inputs)``: a stone's pass through the frozen teacher, keeping for backward what ``opts`` says.

    With ``opts.recompute`` (``BLOCKKD.RECOMPUTE``) the pass runs under
    ``torch.utils.checkpoint`` (non-reentrant): backward keeps only ``inputs`` and runs
    ``fn`` again when it needs what the pass would have saved, under the same autocast
    state and with the RNG state of the first run restored. Otherwise, with
    ``opts.save_masks`` (``BLOCKKD.SAVE_MASKS``), activations whose values backward does not
    need are kept as bit masks (:class:`_SignMasks`). Either way the values and gradients
    are the same. Without autograd, ``fn(*inputs)``.
    """
    if not torch.is_grad_enabled():
        return fn(*inputs)
    if opts.recompute:
        return checkpoint(fn, *inputs, use_reentrant=False, preserve_rng_state=True)
    if opts.save_masks:
        with _SignMasks():
            return fn(*inputs)
    return fn(*inputs)


def distance(opts: LossOptions, logits: Tensor, target_logits: Tensor, target: Tensor) -> Tensor:
    """The logit distance d(., .) of ``LOGIT_LOSS``: KD, DKD or KD on z-scored logits."""
    if opts.logit_loss == "kd":
        return losses.kd_loss(logits, target_logits, opts.T)
    if opts.logit_loss == "lskd":
        return losses.lskd_loss(logits, target_logits, opts.T)
    return losses.dkd_loss(logits, target_logits, target, opts.dkd_alpha, opts.dkd_beta, opts.T)


def blockkd_loss(opts: LossOptions, s_logits: Tensor, stones: Sequence[Tensor], t_logits: Tensor, target: Tensor,
                 plan: StepPlan, warm: float = 1.0) -> Dict[str, Tensor]:
    """The three loss terms (``docs/blockkd.md``) from student, stone and teacher logits.

    ``plan.weights[i]`` scales stone ``i``'s task and distill terms, ``plan.cross_weights[i]``
    its cross term, ``plan.student_cross`` the student's own cross term; ``warm`` is the
    warm-up factor in [0, 1] on the distill and cross terms. Without stones the cross term is 0.
    """
    task = F.cross_entropy(s_logits, target)
    distill = distance(opts, s_logits, t_logits, target)
    for w, z in zip(plan.weights, stones):
        task = task + w * F.cross_entropy(z, target)
        distill = distill + w * distance(opts, z, t_logits, target)
    if stones:
        ens = torch.stack(list(stones)).mean(0)
        if opts.detach_ensemble:
            ens = ens.detach()
        cross = plan.student_cross * distance(opts, s_logits, ens, target)
        for w, z in zip(plan.cross_weights, stones):
            cross = cross + w * distance(opts, z, ens, target)
    else:
        cross = torch.zeros((), device=task.device)
    return {
        "loss_ce": opts.alpha * task,
        "loss_kd": (opts.beta * warm) * distill,
        "loss_cross": (opts.gamma * warm) * cross,
    }

