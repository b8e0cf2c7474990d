"""ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021).

The student's level features (block outputs ``feats[1:]``, or ``preact_feats[1:]`` with
``STU_PREACT``, plus the pooled vector as a 1x1 map) are visited deepest first by
attention-based fusion (ABF) modules. Each ABF maps its level to a mid width (1x1 conv
+ BN), fuses it with the up-sampled residual of the deeper level through two sigmoid
attention maps (a 1x1 conv on their concatenation), resizes to the teacher's map and
produces the teacher's width (3x3 conv + BN). The outputs are matched to the teacher's
pre-activation block features plus its pooled vector by the hierarchical context loss:

``L = CE_WEIGHT * CE + REVIEWKD_WEIGHT * min(epoch / WARMUP_EPOCHS, 1) * sum_levels HCL``

Level geometry (``CFG.REVIEWKD``)
    ``IN_CHANNELS`` / ``OUT_CHANNELS`` list the student / teacher widths shallow to
    deep; ``SHAPES`` / ``OUT_SHAPES`` the student / teacher spatial sizes deep to
    shallow (mdistiller's conventions). A key left at its default is derived from the
    two models (one dummy forward at ``input_size``, the image side the assembler passes), so every pair works
    without hand-written lists; a key set to another value is used as given and
    checked against the models. With ``L`` levels, the ``L`` deepest levels of each
    model are paired (``L`` = the smaller level count, or the length of an explicit
    list). The mid width is ``min(MAX_MID_CHANNEL, IN_CHANNELS[-1])``.

State-dict keys (``abfs.<i>.conv1/conv2/att_conv``, ``abfs.0`` the deepest level) are
mdistiller's.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import CFG
from ..errors import ConfigError
from . import losses
from ..registry import register_distiller
from .base import Distiller
from .dkd import require_epoch

Level = Tuple[int, int]  # (channels, spatial size)


class ABF(nn.Module):
    """Attention-based fusion module of one level.

    Args:
        in_channels: width of the student feature of this level.
        mid_channels: width of the fused (residual) map passed to the next level.
        out_channels: width of the teacher feature of this level.
        fuse: False for the deepest level (nothing to fuse with).

    ``forward(x, residual, shape, out_shape) -> (out, new_residual)``: with
    ``h = conv1(x)`` and ``r`` the residual up-sampled (nearest) to ``shape``,
    ``a = att_conv(cat[h, r])`` and ``f = h * a[:, 0] + r * a[:, 1]`` (``f = h`` without
    fusion); ``f`` is resized (nearest) to ``out_shape``, ``out = conv2(f)`` has
    ``out_channels`` channels and ``new_residual = f`` has ``mid_channels``.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None = None, shape: int | None = None, out_shape: int | None = None):
        x = self.conv1(x)
        if self.att_conv is not None:
            # att_conv(cat[x, up(r)]) computed as conv_x(x) + up(conv_r(r)): a 1x1 conv
            # commutes with nearest up-sampling, so the residual's half runs at its own
            # (smaller) resolution and the concatenated map is never materialised
            conv = self.att_conv[0]
            mid = x.shape[1]
            logits = F.conv2d(x, conv.weight[:, :mid], conv.bias)
            logits_r = F.conv2d(residual, conv.weight[:, mid:])
            if residual.shape[-2:] != (shape, shape):
                residual = F.interpolate(residual, size=(shape, shape), mode="nearest")
                logits_r = F.interpolate(logits_r, size=(shape, shape), mode="nearest")
            att = torch.sigmoid(logits + logits_r)
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        if out_shape is not None and (x.shape[-1] != out_shape or x.shape[-2] != out_shape):
            x = F.interpolate(x, size=(out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def _first_conv_in_channels(model: nn.Module, default: int = 3) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return default


@torch.no_grad()
def model_levels(model: nn.Module, image_size: int, key: str) -> List[Level]:
    """``(channels, size)`` of ``feats[key][1:]`` plus the pooled vector (size 1), shallow to deep.

    One dummy forward of a single image in eval mode (BN statistics untouched).
    """
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, _first_conv_in_channels(model), image_size, image_size, device=p.device if p is not None else None)
        _, feats = model(x)
    finally:
        model.train(was_training)
    levels = [(int(f.shape[1]), int(f.shape[-1])) for f in feats[key][1:]]
    levels.append((int(feats["pooled_feat"].shape[1]), 1))
    return levels


def _pooled_map(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], v.shape[1], 1, 1)


@register_distiller("REVIEWKD")
class ReviewKD(Distiller):
    """ReviewKD (registered as ``REVIEWKD``); loss keys ``loss_ce`` and ``loss_kd``.

    Learnable extras: the ABF modules (``self.abfs``, deepest level first).
    ``forward_train`` needs ``epoch`` for the warm-up. ``input_size`` (the image side)
    is required: the level geometry is measured with one dummy forward at that size.
    """

    config_node = "REVIEWKD"
    table_order = 40

    @classmethod
    def check_cfg(cls, cfg) -> None:
        """ReviewKD's ABFs hold BatchNorms on a 1x1 map (the pooled vector): a batch of 1 cannot train them."""
        if int(cfg.SOLVER.BATCH_SIZE) < 2:
            raise ConfigError(
                f"SOLVER.BATCH_SIZE is {cfg.SOLVER.BATCH_SIZE}; REVIEWKD needs at least 2 images per process (its "
                "fusion modules batch-normalise 1x1 maps, which one image cannot); use a batch of 2 or more")

    def __init__(self, student, teacher, cfg, input_size: int | None = None, **kwargs):
        super().__init__(student, teacher, cfg, input_size=input_size, **kwargs)
        if teacher is None:
            raise ConfigError("DISTILLER.TYPE REVIEWKD needs a teacher; set DISTILLER.TEACHER")
        for role, model in (("student", student), ("teacher", teacher)):
            info = getattr(model, "feature_info", None) or [{}]
            if info[-1].get("kind", "map") == "tokens":
                raise ConfigError(
                    f"DISTILLER.TYPE REVIEWKD fuses CNN feature maps, but the {role} {type(model).__name__} is a "
                    "transformer (token sequences); distil transformers with KD, DKD, LSKD or BLOCKKD")
        if self.input_size is None or self.input_size < 1:
            raise TypeError("ReviewKD needs input_size, the side of the input images (the assembler passes it)")
        self.check_cfg(cfg)
        c = cfg.REVIEWKD
        self.ce_loss_weight = float(c.CE_WEIGHT)
        self.reviewkd_loss_weight = float(c.REVIEWKD_WEIGHT)
        self.warmup_epochs = float(c.WARMUP_EPOCHS)
        if self.warmup_epochs < 0:
            raise ConfigError(f"REVIEWKD.WARMUP_EPOCHS is {c.WARMUP_EPOCHS}; use a number of epochs >= 0")
        if int(c.MAX_MID_CHANNEL) < 1:
            raise ConfigError(f"REVIEWKD.MAX_MID_CHANNEL is {c.MAX_MID_CHANNEL}; it must be >= 1")
        self.stu_preact = bool(c.STU_PREACT)
        self._student_key = "preact_feats" if self.stu_preact else "feats"

        in_channels, out_channels, shapes, out_shapes = self._geometry(cfg)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.shapes, self.out_shapes = shapes, out_shapes
        self.num_levels = len(in_channels)
        mid_channel = min(int(c.MAX_MID_CHANNEL), in_channels[-1])
        n = self.num_levels
        # abfs[0] serves the deepest level (the pooled vector), as in mdistiller
        self.abfs = nn.ModuleList(
            ABF(in_channels[i], mid_channel, out_channels[i], fuse=i < n - 1) for i in reversed(range(n))
        )
        # the ABFs run channels-last (their inputs are converted in review()): their
        # wide convs and BNs are markedly faster in that layout (about 1.6x on CPU)
        self.abfs.to(memory_format=torch.channels_last)

    # -- geometry --------------------------------------------------------------------
    def _geometry(self, cfg):
        c, d = cfg.REVIEWKD, CFG.REVIEWKD  # CFG: the defaults, to tell which lists the config sets
        size = self.input_size
        s_levels = model_levels(self.student, size, self._student_key)
        t_levels = model_levels(self.teacher, size, "preact_feats")
        keys = ("IN_CHANNELS", "OUT_CHANNELS", "SHAPES", "OUT_SHAPES")
        explicit = {k: [int(v) for v in c[k]] for k in keys if list(c[k]) != list(d[k])}
        lengths = {len(v) for v in explicit.values()}
        if len(lengths) > 1:
            raise ConfigError(
                "REVIEWKD lists set in the config have different lengths ("
                + ", ".join(f"{k}={v}" for k, v in explicit.items())
                + "); give one entry per level in each, or leave them at their defaults to derive them"
            )
        n = lengths.pop() if lengths else min(len(s_levels), len(t_levels))
        if not 1 <= n <= min(len(s_levels), len(t_levels)):
            raise ConfigError(
                f"REVIEWKD lists have {n} levels but the student has {len(s_levels)} and the teacher "
                f"{len(t_levels)} (block outputs + pooled vector); use at most "
                f"{min(len(s_levels), len(t_levels))} entries or leave the lists at their defaults"
            )
        s_levels, t_levels = s_levels[-n:], t_levels[-n:]
        derived = {
            "IN_CHANNELS": [ch for ch, _ in s_levels],
            "OUT_CHANNELS": [ch for ch, _ in t_levels],
            "SHAPES": [hw for _, hw in reversed(s_levels)],
            "OUT_SHAPES": [hw for _, hw in reversed(t_levels)],
        }
        for k in ("IN_CHANNELS", "OUT_CHANNELS"):
            if k in explicit and explicit[k] != derived[k]:
                who = "student" if k == "IN_CHANNELS" else "teacher"
                raise ConfigError(
                    f"REVIEWKD.{k} is {explicit[k]} but the {who}'s level widths are {derived[k]}; "
                    f"set REVIEWKD.{k} to {derived[k]} or leave it at its default to derive it"
                )
        out = {k: explicit.get(k, derived[k]) for k in keys}
        return out["IN_CHANNELS"], out["OUT_CHANNELS"], out["SHAPES"], out["OUT_SHAPES"]

    # -- forward ---------------------------------------------------------------------
    def _levels(self, feats: dict, key: str) -> List[Tensor]:
        levels = list(feats[key][1:]) + [_pooled_map(feats["pooled_feat"])]
        return levels[-self.num_levels:]

    def review(self, student_levels: Sequence[Tensor]) -> List[Tensor]:
        """ABF outputs for the student levels (shallow to deep), returned shallow to deep."""
        n = self.num_levels
        results = []
        residual = None
        for i, abf in enumerate(self.abfs):
            x = student_levels[n - 1 - i].contiguous(memory_format=torch.channels_last)
            if i and x.shape[-1] != self.shapes[i]:
                raise ConfigError(
                    f"REVIEWKD.SHAPES[{i}] is {self.shapes[i]} but the student's feature at that level is "
                    f"{tuple(x.shape[-2:])}; fix SHAPES or leave it at its default to derive it"
                )
            out, residual = abf(x, residual, self.shapes[i], self.out_shapes[i])
            results.append(out)
        results.reverse()
        return results

    def forward_train(self, image, target, **kwargs):
        """Return ``(student_logits, {"loss_ce", "loss_kd"})``; needs ``epoch=``."""
        if image.shape[0] < 2:
            raise ConfigError(
                f"REVIEWKD got a training batch of {image.shape[0]} image; it needs at least 2 per process (its fusion "
                "modules batch-normalise 1x1 maps); raise SOLVER.BATCH_SIZE")
        warm = losses.warmup_factor(require_epoch(kwargs, "ReviewKD"), self.warmup_epochs)
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        results = self.review(self._levels(feats_student, self._student_key))
        targets = self._levels(feats_teacher, "preact_feats")
        for i, (r, t) in enumerate(zip(results, targets)):
            if r.shape[-2:] != t.shape[-2:]:
                j = self.num_levels - 1 - i
                raise ConfigError(
                    f"REVIEWKD.OUT_SHAPES[{j}] is {self.out_shapes[j]} but the teacher's feature at that level is "
                    f"{tuple(t.shape[-2:])}; fix OUT_SHAPES or leave it at its default to derive it"
                )
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_review = (self.reviewkd_loss_weight * warm) * losses.hcl_loss(results, targets)
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_review}
