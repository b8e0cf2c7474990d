"""Block-KD: block-wise logit distillation through stepping-stone models.

Yu et al., "Decoupling Dark Knowledge via Block-wise Logit Distillation for
Feature-level Alignment", IEEE TAI 2024. Full description and design choices:
``docs/blockkd.md``.

Idea
    Logit KD only aligns final outputs. Block-KD aligns intermediate student features
    *through logits*: the student's first blocks are spliced onto the frozen teacher's
    remaining blocks, so a student feature is judged by what the rest of the teacher
    makes of it. For each paired block ``i`` the *stepping stone*

        N_i = T_head . T_n ... T_{j(i)+1} . C_i . S_i ... S_1 . S_stem

    (``C_i`` a trainable connector, ``j(i)`` the teacher block paired with student
    block ``i``) gives logits ``Y^{N_i}``. Stones live only in training.

Loss (``n`` stones, ordered shallow -> deep, ``w_i = 1 / 2^(n-i)``)
    task    = CE(Y^S, y) + sum_i w_i CE(Y^{N_i}, y)
    distill = d(Y^S, Y^T) + sum_i w_i d(Y^{N_i}, Y^T)
    cross   = d(Y^S, Y^E) + sum_i w_i' d(Y^{N_i}, Y^E),   Y^E = mean_i Y^{N_i}
    L = ALPHA * task + warm * (BETA * distill + GAMMA * cross)

    ``d`` is temperature-scaled KL (``LOGIT_LOSS`` kd), Decoupled KD (dkd) or KD on
    z-scored logits (lskd); ``w_i' = w_i`` if ``WEIGHT_CROSS`` else 1; ``Y^E`` is
    detached if ``DETACH_ENSEMBLE`` (default off: gradient flows into it); ``warm`` ramps
    linearly over ``WARMUP`` epochs.
    Loss keys: ``loss_ce`` = ALPHA*task, ``loss_kd`` = BETA*warm*distill,
    ``loss_cross`` = GAMMA*warm*cross.

Stones (``STONES``)
    ``all``: every stone. ``last:K``: only the K deepest exist (connectors are built for
    those alone; weights unchanged, ensemble of those K). ``sample:K``: K stones drawn
    uniformly per step; ``every:K``: every stone, on one step in K (the other steps
    train the student's own task and distill terms only). ``STONE_SCALE`` sets the
    factor on the stones' terms (and, under ``every:K``, on the student's cross term):
    ``unbiased`` (``n/K`` for ``sample:K``, ``K`` for ``every:K``: the expected loss
    equals ``all``'s for the task and distill terms) or ``none`` (1). Under
    ``sample:K`` the cross terms use the ensemble of the drawn stones (the exact ``Y^E``
    needs every stone). When K divides n the draws walk a random permutation (every
    stone once per n/K steps: each step's draw is still uniform, with less variance
    across steps). A step draws once: the replicas of a DataParallel step share its
    draw. ``DENSE_EPOCHS`` N > 0 runs every stone on every step while ``epoch <= N``
    (the draw state untouched), the cheap schedule after. ``STONE_WEIGHTS``:
    ``halving`` (``w_i = 1/2^(n-i)``, the paper's) or ``uniform`` (``w_i = 1``).

Block pairing (``PAIRS``)
    Empty: pair student and teacher blocks of equal output stride (within a stride,
    the deepest blocks pair up in order); if that does not pair the two last blocks,
    pair the last ``min(n_s, n_t)`` blocks in order instead. Transformer pairs (token
    stages) pair by relative depth instead (:func:`pair_by_depth`). Explicit
    ``[[student_block, teacher_block], ...]`` (1-based) overrides. A CNN and a
    transformer cannot be paired (one :class:`ConfigError`).

Connectors (``CONNECTOR``)
    CNN pairs: ``conv1x1_bn`` (default), ``conv3x3_bn``, ``conv1x1_bn_relu``, ``conv3x3_bn_relu``;
    the spatial size is matched by average pooling (student map larger) or bilinear
    up-sampling (smaller), with the convolution run at the smaller resolution.
    Transformer pairs: ``linear`` or ``linear_ln`` (:class:`TokenConnector`: a Linear
    across hidden sizes, then a LayerNorm for ``linear_ln``); the token count must match
    (the same tokenizer, or the same patch grid). :func:`build_connector` chooses by the
    stage kind and refuses a connector of the other kind.

Cost
    The teacher runs once per step without autograd for ``Y^T``; stones reuse the
    student's block outputs; teacher weights never get gradients (they are frozen and
    only pass input-gradients); stones entering the teacher at different depths are
    concatenated along the batch so each teacher block runs once per step
    (``BATCH_STONES``: ``auto`` does so on CUDA, where bigger batches fill the device;
    on CPU separate passes measured faster). The teacher computes with its BatchNorms
    folded into the convolutions (exact for a frozen teacher; ``Distiller.teacher_model``),
    which removes BN from the stones' backward. What the stones keep for backward is cut by
    ``SAVE_MASKS`` (bit masks where backward needs an activation's sign or nothing of it) or
    ``RECOMPUTE`` (the teacher passes run again in backward); the gradients are the same
    (:func:`~.blockkd_core.stone_pass`). The exported student is the plain student.

Built only on the staged-model view (:mod:`mdistiller_blockkd.models.staged`), so
it works for any pair of models in the toolbox (CIFAR zoo, timm backbones).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.staged import StageInfo, StagedView
from ..models.tokens import TokenStates
from ..registry import register_distiller
from . import losses
from .base import Distiller
from .blockkd_core import (CNN_CONNECTORS, TOKEN_CONNECTORS, BlockKDOptions, StepPlan, StonePlanner,
                           blockkd_loss, pair_list, stone_pass)

def check_options(c) -> None:
    """Validate the ``CFG.BLOCKKD`` node ``c`` without building anything (raises :class:`ConfigError`)."""
    BlockKDOptions.from_node(c)


class Connector(nn.Module):
    """Map a student block output to the input space of the next teacher block.

    Channels by a convolution + BN (+ ReLU); spatial size by average pooling when the
    student map is larger, bilinear up-sampling when it is smaller. The convolution
    runs at the smaller of the two resolutions.
    """

    def __init__(self, src: StageInfo, dst: StageInfo, kind: str = "conv1x1_bn"):
        super().__init__()
        if kind not in CNN_CONNECTORS:
            raise ConfigError(f"BLOCKKD.CONNECTOR is '{kind}'; use one of {', '.join(CNN_CONNECTORS)}")
        k = 3 if kind.startswith("conv3x3") else 1
        layers = [
            nn.Conv2d(src.num_chs, dst.num_chs, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(dst.num_chs),
        ]
        if kind.endswith("relu"):
            layers.append(nn.ReLU(inplace=True))
        self.proj = nn.Sequential(*layers)
        self.scale = dst.reduction / src.reduction  # >1: student map is larger -> pool

    def forward(self, x: Tensor) -> Tensor:
        if self.scale > 1:
            s = int(round(self.scale))
            x = F.avg_pool2d(x, s) if s == self.scale else F.adaptive_avg_pool2d(
                x, [max(1, round(d / self.scale)) for d in x.shape[2:]])
            return self.proj(x)
        x = self.proj(x)
        if self.scale < 1:
            size = [int(round(d / self.scale)) for d in x.shape[2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


class TokenConnector(nn.Module):
    """Map a transformer student's block output to the teacher's hidden size.

    A Linear over the last dimension (``src.num_chs -> dst.num_chs``), then a LayerNorm
    when ``layer_norm``. Takes a ``(B, N, C)`` tensor (ViTs) or
    :class:`~mdistiller_blockkd.models.tokens.TokenStates` (text: the attention mask passes
    through unchanged). The token count must already match: same patch size, same tokens.
    """

    def __init__(self, src: StageInfo, dst: StageInfo, layer_norm: bool = True):
        super().__init__()
        if src.reduction != dst.reduction:
            raise ConfigError(
                f"Block-KD: the student's tokens come from patches of {src.reduction} px and the teacher's from "
                f"{dst.reduction} px; a transformer pair needs the same token grid (same patch size and image size)")
        self.proj = nn.Linear(src.num_chs, dst.num_chs)
        self.norm = nn.LayerNorm(dst.num_chs) if layer_norm else nn.Identity()

    def forward(self, x):
        if isinstance(x, TokenStates):
            return x.with_hidden(self.norm(self.proj(x.hidden)))
        return self.norm(self.proj(x))


def _check_same_kind(student: StagedView, teacher: StagedView) -> str:
    """The stage kind shared by student and teacher (``map`` or ``tokens``); a CNN-transformer pair is an error."""
    s, t = student.block_info[0].kind, teacher.block_info[0].kind
    if s != t:
        names = {"map": "a CNN (feature maps)", "tokens": "a transformer (token sequences)"}
        raise ConfigError(
            f"Block-KD cannot connect {names.get(s, s)} student ({type(student.model).__name__}) to "
            f"{names.get(t, t)} teacher ({type(teacher.model).__name__}): its stones feed student blocks to teacher "
            "blocks; use two CNNs or two transformers (KD, DKD and LSKD distil across them)")
    return s


def build_connector(src: StageInfo, dst: StageInfo, kind: str = "conv1x1_bn") -> nn.Module:
    """The connector ``kind`` from a student stage ``src`` to a teacher stage ``dst``, chosen by the stage kind.

    Feature maps get a :class:`Connector` (a ``conv*`` kind), token sequences a
    :class:`TokenConnector` (``linear`` / ``linear_ln``); a kind of the other family, or
    stages of different kinds, raise :class:`ConfigError` naming the fix.
    """
    if src.kind != dst.kind:
        raise ConfigError(f"Block-KD cannot connect a '{src.kind}' stage to a '{dst.kind}' stage (a CNN and a "
                          "transformer); use two CNNs or two transformers")
    if src.kind == "tokens":
        if kind not in TOKEN_CONNECTORS:
            raise ConfigError(f"BLOCKKD.CONNECTOR is '{kind}' but the student and teacher are transformers; use "
                              f"{' or '.join(TOKEN_CONNECTORS)} (a Linear across hidden sizes, optionally with LayerNorm)")
        return TokenConnector(src, dst, layer_norm=kind == "linear_ln")
    if kind in TOKEN_CONNECTORS:
        raise ConfigError(f"BLOCKKD.CONNECTOR is '{kind}', a transformer connector, but the student and teacher are "
                          f"CNNs; use one of {', '.join(CNN_CONNECTORS)}")
    return Connector(src, dst, kind)


def pair_by_depth(ns: int, nt: int) -> List[Tuple[int, int]]:
    """Pairs ``(student_block, teacher_block)`` (0-based) by relative depth.

    Student block ``i`` of ``ns`` ends at depth ``(i + 1) / ns``; it pairs with the teacher
    block ending nearest that depth, ``j = floor((i + 1) * nt / ns + 1/2) - 1`` (halves
    round up): with ``nt = k * ns`` exactly block ``k (i + 1) - 1``. A student block
    nearer the teacher's stem than its first block (``j < 0``, only when ``ns > 2 nt``)
    gets no stone; when ``ns > nt`` several stones may enter the teacher at one block.
    """
    pairs = []
    for i in range(ns):
        j = (2 * (i + 1) * nt + ns) // (2 * ns) - 1
        if j >= 0:
            pairs.append((i, j))
    return pairs


def pair_blocks(student: StagedView, teacher: StagedView, explicit: Sequence = ()) -> List[Tuple[int, int]]:
    """Return stone pairs ``(student_block, teacher_block)`` (0-based), shallow to deep."""
    ns, nt = student.num_blocks, teacher.num_blocks
    kind = _check_same_kind(student, teacher)
    explicit = pair_list(explicit)
    if explicit:
        pairs = []
        for p in explicit:
            if not (1 <= p[0] <= ns and 1 <= p[1] <= nt):
                raise ConfigError(
                    f"BLOCKKD.PAIRS entry {list(p)} is invalid: expected [student_block, teacher_block] with "
                    f"1 <= student_block <= {ns} and 1 <= teacher_block <= {nt}")
            pairs.append((int(p[0]) - 1, int(p[1]) - 1))
        for a, b in zip(pairs, pairs[1:]):
            if not (a[0] < b[0] and a[1] <= b[1]):
                raise ConfigError(f"BLOCKKD.PAIRS {[list(p) for p in explicit]} must go strictly deeper in the "
                                  "student and never shallower in the teacher")
        return pairs
    if kind == "tokens":
        return pair_by_depth(ns, nt)
    pairs = []
    for r in sorted({b.reduction for b in student.block_info}):
        s_idx = [i for i, b in enumerate(student.block_info) if b.reduction == r]
        t_idx = [j for j, b in enumerate(teacher.block_info) if b.reduction == r]
        k = min(len(s_idx), len(t_idx))
        if k:
            pairs += list(zip(s_idx[-k:], t_idx[-k:]))
    pairs.sort()
    monotone = all(a[1] < b[1] for a, b in zip(pairs, pairs[1:]))
    if pairs and monotone and pairs[-1] == (ns - 1, nt - 1):
        return pairs
    k = min(ns, nt)
    return [(ns - k + i, nt - k + i) for i in range(k)]


@register_distiller("BLOCKKD")
class BlockKD(Distiller):
    """Block-wise logit distillation (``DISTILLER.TYPE: BLOCKKD``); see the module docstring."""

    config_node = "BLOCKKD"
    label_keys = ("BLOCKKD.STONES", "BLOCKKD.LOGIT_LOSS", "BLOCKKD.CONNECTOR", "BLOCKKD.STONE_SCALE",
                  "BLOCKKD.STONE_WEIGHTS")
    bare_label_keys = ("BLOCKKD.STONES", "BLOCKKD.LOGIT_LOSS", "BLOCKKD.CONNECTOR")
    hyper_keys = ("BLOCKKD.DENSE_EPOCHS", "BLOCKKD.ALPHA", "BLOCKKD.BETA", "BLOCKKD.GAMMA", "BLOCKKD.T", "BLOCKKD.WARMUP",
                  "BLOCKKD.DETACH_ENSEMBLE", "BLOCKKD.WEIGHT_CROSS", "BLOCKKD.DKD_BETA")
    table_order = 50

    def __init__(self, student, teacher, cfg, **kwargs):
        super().__init__(student, teacher, cfg, **kwargs)
        if teacher is None:
            raise ConfigError("BLOCKKD needs a teacher (DISTILLER.TEACHER)")
        #: every BLOCKKD option, validated once
        self.opts = BlockKDOptions.from_node(cfg.BLOCKKD)
        sview, tview = student.staged_view(), teacher.staged_view()
        pairs = pair_blocks(sview, tview, self.opts.pairs)
        #: which stones exist and which run on each step (with the draw state)
        self.planner = StonePlanner(self.opts, len(pairs))
        self.pairs = [pairs[k] for k in self.planner.keep]
        self.connectors = nn.ModuleList(
            build_connector(sview.block_info[i], tview.block_info[j], self.opts.connector) for i, j in self.pairs)

    # what the tools read (benchmark, cost model, describe): the planner's
    mode = property(lambda self: self.planner.mode)
    k = property(lambda self: self.planner.k)
    stone_ids = property(lambda self: self.planner.stone_ids)
    stone_weights = property(lambda self: self.planner.stone_weights)
    has_unused_parameters = property(lambda self: self.planner.has_unused_parameters)

    @classmethod
    def check_cfg(cls, cfg) -> None:
        check_options(cfg.BLOCKKD)

    @property
    def num_stones(self) -> int:
        return len(self.pairs)

    # views are built from the registered modules at every use, never kept: a DataParallel
    # replica must run its own student (on its device), not the module's
    @property
    def sview(self) -> StagedView:
        """The student's staged view."""
        return self.student.staged_view()

    @property
    def tview(self) -> StagedView:
        """The (unfolded) teacher's staged view."""
        return self.teacher.staged_view()

    # -- stones ---------------------------------------------------------------------
    def _student_forward(self, image: Tensor):
        view = self.sview
        h = view.stem(image)
        outs = []
        for i in range(view.num_blocks):
            h = view.block(i, h)
            outs.append(h)
        return view.head(h), outs

    def _stone_logits(self, outs: List[Tensor], active: Sequence[int], tview: StagedView) -> List[Tensor]:
        """Logits of the stones ``active`` (indices into ``self.pairs``) from student block outputs.

        ``tview`` is the staged view of the module computing the teacher (see ``teacher_model``).
        """
        if not active:
            return []
        entry = {k: self.pairs[k][1] + 1 for k in active}  # first teacher block each stone runs
        inputs = {k: self.connectors[k](outs[self.pairs[k][0]]) for k in active}
        batch = self.opts.batch_stones == "on" or (self.opts.batch_stones == "auto" and outs[0].is_cuda)
        if not batch:
            return [stone_pass(tview.forward_from, inputs[k], entry[k], opts=self.opts) for k in active]

        def concatenated(*xs):  # one concatenated batch: stones join it where they enter the teacher
            running, order = None, []
            for j in range(min(entry.values()), tview.num_blocks + 1):
                joining = [n for n, k in enumerate(active) if entry[k] == j]
                if joining:
                    parts = ([running] if running is not None else []) + [xs[n] for n in joining]
                    running = parts[0] if len(parts) == 1 else torch.cat(parts)
                    order += joining
                if j < tview.num_blocks:
                    running = tview.block(j, running)
            chunks = dict(zip(order, tview.head(running).split(outs[0].shape[0])))
            return tuple(chunks[n] for n in range(len(active)))
        return list(stone_pass(concatenated, *(inputs[k] for k in active), opts=self.opts))

    def _forward(self, image: Tensor, active: Sequence[int]):
        """Student logits, the ``active`` stones' logits and the teacher's (once, no autograd)."""
        s_logits, outs = self._student_forward(image)
        tview = self.teacher_model(image).staged_view()
        with torch.no_grad():
            t_logits = tview(image)
        return s_logits, self._stone_logits(outs, active, tview), t_logits

    def forward_stones(self, image: Tensor):
        """``(student_logits, [Y^{N_1}, ..., Y^{N_n}], teacher_logits)`` for every stone."""
        return self._forward(image, range(self.num_stones))

    def get_extra_state(self):
        """The planner's draw state (``sample:K`` walk, ``every:K`` step count), saved so resume is exact."""
        return self.planner.state_dict()

    def set_extra_state(self, state):
        self.planner.load_state_dict(state)

    # -- loss -----------------------------------------------------------------------
    def step_plan(self, epoch=math.inf) -> StepPlan:
        """This step's stones and factors (:meth:`StonePlanner.plan`; advances the draw state once per step)."""
        return self.planner.plan(self, epoch)

    def loss_terms(self, s_logits, stones, t_logits, target, plan: StepPlan, epoch=math.inf):
        """:func:`~.blockkd_core.blockkd_loss` with the warm-up factor of ``epoch``."""
        return blockkd_loss(self.opts.loss, s_logits, stones, t_logits, target, plan,
                            losses.warmup_factor(epoch, self.opts.loss.warmup))

    def forward_train(self, image, target, **kwargs):
        epoch = kwargs.get("epoch", math.inf)
        plan = self.step_plan(epoch)
        s_logits, stones, t_logits = self._forward(image, plan.active)
        return s_logits, self.loss_terms(s_logits, stones, t_logits, target, plan, epoch)

    @torch.no_grad()
    def eval_logits(self, image):
        """Every stone's logits and the teacher's, scored by the trainer at evaluation."""
        _, stones, t_logits = self.forward_stones(image)
        out = {f"stone{sid}": z for sid, z in zip(self.stone_ids, stones)}
        out["teacher"] = t_logits
        return out

    def describe(self) -> str:
        """The base line, then one line per stone: which student block feeds which teacher block."""
        lines = [super().describe()]
        sview, tview = self.sview, self.tview
        nt = tview.num_blocks
        for sid, (i, j), w in zip(self.stone_ids, self.pairs, self.stone_weights):
            si, ti = sview.block_info[i], tview.block_info[j]
            rest = "teacher head only" if j + 1 == nt else (
                f"teacher block {nt} + head" if j + 2 == nt else f"teacher blocks {j + 2}..{nt} + head")
            lines.append(f"stone{sid}: student block {i + 1} ({si.num_chs}ch, /{si.reduction}) -> connector -> "
                         f"{rest} (input {ti.num_chs}ch, /{ti.reduction}), w={w:g}")
        return "\n".join(lines)
