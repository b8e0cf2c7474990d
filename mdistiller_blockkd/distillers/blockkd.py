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
    across steps). ``DENSE_EPOCHS`` N > 0 runs every stone on every step while
    ``epoch <= N`` (the draw state untouched), the cheap schedule after. ``STONE_WEIGHTS``: ``halving`` (``w_i = 1/2^(n-i)``, the paper's) or
    ``uniform`` (``w_i = 1``).

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
    which removes BN from the stones' backward. The exported student is the plain student.

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
from . import losses
from ..registry import register_distiller
from .base import Distiller, shared_attribute

CNN_CONNECTORS = ("conv1x1_bn", "conv3x3_bn", "conv1x1_bn_relu", "conv3x3_bn_relu")
TOKEN_CONNECTORS = ("linear", "linear_ln")  # transformer pairs
CONNECTORS = CNN_CONNECTORS + TOKEN_CONNECTORS
LOGIT_LOSSES = ("kd", "dkd", "lskd")
STONE_MODES = ("all", "last", "sample", "every")
STONE_SCALES = ("unbiased", "none")
STONE_WEIGHTS = ("halving", "uniform")


def _choice(c, key: str, valid) -> str:
    value = str(c[key]).strip().lower()
    if value not in valid:
        raise ConfigError(f"BLOCKKD.{key} is '{c[key]}'; use one of {', '.join(valid)}")
    return value


def check_options(c) -> None:
    """Validate the ``CFG.BLOCKKD`` node ``c`` without building anything (raises :class:`ConfigError`)."""
    _choice(c, "CONNECTOR", CONNECTORS)
    _choice(c, "LOGIT_LOSS", LOGIT_LOSSES)
    _choice(c, "BATCH_STONES", ("auto", "on", "off"))
    _choice(c, "STONE_SCALE", STONE_SCALES)
    _choice(c, "STONE_WEIGHTS", STONE_WEIGHTS)
    if not float(c.T) > 0:
        raise ConfigError(f"BLOCKKD.T is {c.T}; the temperature must be > 0 (4 on CIFAR-style data, 1 on ImageNet)")
    if not float(c.DENSE_EPOCHS) >= 0:
        raise ConfigError(f"BLOCKKD.DENSE_EPOCHS is {c.DENSE_EPOCHS}; use 0 (the STONES schedule from the start) or a "
                          "positive number of epochs with every stone")
    if not float(c.WARMUP) >= 0:
        raise ConfigError(f"BLOCKKD.WARMUP is {c.WARMUP}; use 0 (no warm-up) or a positive number of epochs")
    for key in ("ALPHA", "BETA", "GAMMA"):
        if not float(c[key]) >= 0:
            raise ConfigError(f"BLOCKKD.{key} is {c[key]}; loss weights must be >= 0")
    parse_stones(c.STONES, None)
    _pair_list(c.PAIRS)


def _pair_list(explicit) -> List[Tuple[int, int]]:
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
    explicit = _pair_list(explicit)
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


@register_distiller("BLOCKKD")
class BlockKD(Distiller):
    """Block-wise logit distillation (``DISTILLER.TYPE: BLOCKKD``); see the module docstring."""

    def __init__(self, student, teacher, cfg, **kwargs):
        super().__init__(student, teacher, cfg, **kwargs)
        if teacher is None:
            raise ConfigError("BLOCKKD needs a teacher (DISTILLER.TEACHER)")
        c = cfg.BLOCKKD
        check_options(c)
        self.sview: StagedView = student.staged_view()
        self.tview: StagedView = teacher.staged_view()
        pairs = pair_blocks(self.sview, self.tview, c.PAIRS)
        keep = self.setup_options(c, len(pairs))
        self.pairs = [pairs[k] for k in keep]
        self.connectors = nn.ModuleList(
            build_connector(self.sview.block_info[i], self.tview.block_info[j], str(c.CONNECTOR).lower())
            for i, j in self.pairs)
        self.batch_stones = str(c.BATCH_STONES).lower()

    def setup_options(self, c, n: int) -> range:
        """Read the stone selection, stone weights and loss options of ``c`` for ``n`` stones.

        Returns the indices of the stones that exist (``last:K``: the other stones do not).
        Shared with the detection Block-KD, which has its own stones.
        """
        self.mode, self.k = parse_stones(c.STONES, n)
        uniform = str(c.STONE_WEIGHTS).lower() == "uniform"
        weights = [1.0 if uniform else 1.0 / 2 ** (n - 1 - k) for k in range(n)]
        keep = range(n - self.k, n) if self.mode == "last" else range(n)  # last:K: the other stones do not exist
        #: 1-based numbers of the stones among all of the pair's (``stone<id>`` in logs)
        self.stone_ids = [k + 1 for k in keep]
        self.stone_weights = [weights[k] for k in keep]
        self.stone_scale = str(c.STONE_SCALE).lower()
        self.dense_epochs = float(c.DENSE_EPOCHS)
        self.has_unused_parameters = self.mode in ("sample", "every")
        self._deck, self._pos = [], 0  # sample:K draw state (see _active_stones)
        self._step = 0  # every:K: training steps taken (see _active_stones)
        self.logit_loss, self.T = str(c.LOGIT_LOSS).lower(), float(c.T)
        self.dkd_alpha, self.dkd_beta = float(c.DKD_ALPHA), float(c.DKD_BETA)
        self.alpha, self.beta, self.gamma = float(c.ALPHA), float(c.BETA), float(c.GAMMA)
        self.warmup = float(c.WARMUP)
        self.detach_ensemble, self.weight_cross = bool(c.DETACH_ENSEMBLE), bool(c.WEIGHT_CROSS)
        return keep

    @classmethod
    def check_cfg(cls, cfg) -> None:
        check_options(cfg.BLOCKKD)

    @property
    def num_stones(self) -> int:
        return len(self.pairs)

    # -- stones ---------------------------------------------------------------------
    def _student_forward(self, image: Tensor):
        h = self.sview.stem(image)
        outs = []
        for i in range(self.sview.num_blocks):
            h = self.sview.block(i, h)
            outs.append(h)
        return self.sview.head(h), outs

    def _stone_logits(self, outs: List[Tensor], active: Sequence[int], tview: StagedView) -> List[Tensor]:
        """Logits of the stones ``active`` (indices into ``self.pairs``) from student block outputs.

        ``tview`` is the staged view of the module computing the teacher (see ``teacher_model``).
        """
        if not active:
            return []
        entry = {k: self.pairs[k][1] + 1 for k in active}  # first teacher block each stone runs
        inputs = {k: self.connectors[k](outs[self.pairs[k][0]]) for k in active}
        batch = self.batch_stones == "on" or (self.batch_stones == "auto" and outs[0].is_cuda)
        if not batch:
            return [tview.forward_from(inputs[k], entry[k]) for k in active]
        # one concatenated batch: stones join it where they enter the teacher
        running, order = None, []
        for j in range(min(entry.values()), tview.num_blocks + 1):
            joining = [k for k in active if entry[k] == j]
            if joining:
                parts = ([running] if running is not None else []) + [inputs[k] for k in joining]
                running = parts[0] if len(parts) == 1 else torch.cat(parts)
                order += joining
            if j < tview.num_blocks:
                running = tview.block(j, running)
        chunks = dict(zip(order, tview.head(running).split(outs[0].shape[0])))
        return [chunks[k] for k in active]

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

    def _active_stones(self) -> Tuple[List[int], float]:
        """Indices of this step's stones and the factor applied to their terms (advances the draw state)."""
        n = self.num_stones
        unbiased = self.stone_scale == "unbiased"
        if self.mode in ("all", "last"):
            return list(range(n)), 1.0
        if self.mode == "every":
            with self._shared.lock:
                step, self._step = self._step, self._step + 1
            if step % self.k:
                return [], 1.0
            return list(range(n)), float(self.k) if unbiased else 1.0
        if n % self.k:
            idx = torch.randperm(n)[: self.k].tolist()
        else:  # stratified: walk a random permutation K stones at a time, every stone once per n/K steps
            with self._shared.lock:  # DataParallel replicas draw one after the other from the shared walk
                if self._pos == 0:
                    self._deck = torch.randperm(n).tolist()
                idx = self._deck[self._pos: self._pos + self.k]
                self._pos = (self._pos + self.k) % n
        return sorted(idx), n / self.k if unbiased else 1.0

    # the draw state (sample:K walk, every:K step count) lives in the distiller's SharedState,
    # so DataParallel replicas (shallow copies made at every forward) advance the module's own
    _deck = shared_attribute("deck", list, list)
    _pos = shared_attribute("pos", int, int)
    _step = shared_attribute("step", int, int)

    def get_extra_state(self):
        """The draw state (``sample:K`` deck and position, ``every:K`` step count), saved so resume is exact."""
        return {"deck": list(self._deck), "pos": self._pos, "step": self._step}

    def set_extra_state(self, state):
        self._deck, self._pos = list(state["deck"]), int(state["pos"])
        self._step = int(state.get("step", 0))

    # -- loss -----------------------------------------------------------------------
    def distance(self, logits: Tensor, target_logits: Tensor, target: Tensor) -> Tensor:
        """The logit distance d(., .) selected by ``BLOCKKD.LOGIT_LOSS``."""
        if self.logit_loss == "kd":
            return losses.kd_loss(logits, target_logits, self.T)
        if self.logit_loss == "lskd":
            return losses.lskd_loss(logits, target_logits, self.T)
        return losses.dkd_loss(logits, target_logits, target, self.dkd_alpha, self.dkd_beta, self.T)

    def blockkd_loss(self, s_logits, stones, t_logits, target, weights, cross_weights, epoch, student_cross=1.0):
        """The three loss terms from student, stone and teacher logits.

        ``weights[i]`` scales stone ``i``'s task and distill terms, ``cross_weights[i]`` its cross term;
        ``student_cross`` scales the student's own cross term. Without stones the cross term is 0.
        """
        task = F.cross_entropy(s_logits, target)
        distill = self.distance(s_logits, t_logits, target)
        for w, z in zip(weights, stones):
            task = task + w * F.cross_entropy(z, target)
            distill = distill + w * self.distance(z, t_logits, target)
        if stones:
            ens = torch.stack(stones).mean(0)
            if self.detach_ensemble:
                ens = ens.detach()
            cross = student_cross * self.distance(s_logits, ens, target)
            for w, z in zip(cross_weights, stones):
                cross = cross + w * self.distance(z, ens, target)
        else:
            cross = torch.zeros((), device=task.device)
        warm = losses.warmup_factor(epoch, self.warmup)
        return {
            "loss_ce": self.alpha * task,
            "loss_kd": (self.beta * warm) * distill,
            "loss_cross": (self.gamma * warm) * cross,
        }

    def step_plan(self, epoch):
        """This step's stones and weights: ``(active, weights, cross_weights, student_cross)``.

        ``DENSE_EPOCHS``: every stone while ``epoch <= DENSE_EPOCHS`` (the draw state untouched);
        else the ``STONES`` schedule (:meth:`_active_stones`, which advances the draw state).
        """
        if self.mode in ("sample", "every") and epoch <= self.dense_epochs:
            active, factor = list(range(self.num_stones)), 1.0
        else:
            active, factor = self._active_stones()
        weights = [self.stone_weights[k] * factor for k in active]
        cross_weights = weights if self.weight_cross else [factor] * len(active)
        return active, weights, cross_weights, (factor if self.mode == "every" else 1.0)

    def forward_train(self, image, target, **kwargs):
        epoch = kwargs.get("epoch", math.inf)
        active, weights, cross_weights, student_cross = self.step_plan(epoch)
        s_logits, stones, t_logits = self._forward(image, active)
        loss = self.blockkd_loss(s_logits, stones, t_logits, target, weights, cross_weights, epoch, student_cross)
        return s_logits, loss

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
        nt = self.tview.num_blocks
        for sid, (i, j), w in zip(self.stone_ids, self.pairs, self.stone_weights):
            si, ti = self.sview.block_info[i], self.tview.block_info[j]
            rest = "teacher head only" if j + 1 == nt else (
                f"teacher block {nt} + head" if j + 2 == nt else f"teacher blocks {j + 2}..{nt} + head")
            lines.append(f"stone{sid}: student block {i + 1} ({si.num_chs}ch, /{si.reduction}) -> connector -> "
                         f"{rest} (input {ti.num_chs}ch, /{ti.reduction}), w={w:g}")
        if self.mode in ("sample", "every") and self.dense_epochs == 0:
            lines.append(f"note: STONES {self.mode}:{self.k} without DENSE_EPOCHS lost accuracy against 'all' in the "
                         f"validation study (docs/blockkd.md, 'Cheap variants'); the measured cheap option is last:2")
        return "\n".join(lines)
