"""Block-KD and DKD inside torchdistill (``pip install "mdistiller_blockkd[torchdistill]"``).

Importing this module registers into torchdistill (tested with 1.1.5):

``mdistiller_blockkd_model`` (model registry)
    any model of this toolbox by name (``resnet56``, ``timm:resnet34.tv_in1k``...):
    kwargs ``name``, ``num_classes``, ``pretrained``.
``BlockKDTeacher`` / ``BlockKDStudent`` (auxiliary model wrappers)
    ``BlockKDTeacher`` wraps the frozen teacher. ``BlockKDStudent`` wraps the student,
    owns the connectors and runs the teacher's remaining blocks: in training its
    forward returns a :class:`BlockKDOutput` (student logits, the stones' logits and
    their weights); in eval mode the student's logits. Its kwargs are the structural
    ``BLOCKKD`` options in lower case: ``stones``, ``connector``, ``pairs``,
    ``batch_stones``, ``stone_scale``, ``stone_weights``, ``recompute``, ``save_masks``, plus ``fold_teacher_bn`` and
    ``channels_last``. The two meet
    through ``link`` (default ``"blockkd"``): torchdistill builds the teacher's wrapper
    first, then the student's.
``BlockKDLoss`` (mid-level loss)
    ``alpha * task + warm * (beta * distill + gamma * cross)`` from the student
    wrapper's output and the teacher's logits; kwargs ``alpha``, ``beta``, ``gamma``,
    ``temperature``, ``warmup``, ``logit_loss``, ``dkd_alpha``, ``dkd_beta``,
    ``detach_ensemble``, ``weight_cross`` (``BLOCKKD`` defaults). The terms are
    computed by the Block-KD core's :func:`~mdistiller_blockkd.distillers.blockkd_core.blockkd_loss`.
``DKDLoss`` (mid-level loss)
    ``ce_weight * CE + warm * (alpha * TCKD + beta * NCKD)`` (mdistiller's ``CFG.DKD``
    defaults), on the student's and the teacher's logits.
``blockkd_pre_epoch_process`` (pre-epoch process)
    torchdistill's default pre-epoch process, then puts a frozen teacher in eval mode
    (torchdistill 1.1.5 never does) and tells every loss term with a ``set_epoch``
    method the 1-based epoch (torchdistill counts from 0), which drives the warm-ups
    exactly as this toolbox's trainer and mdistiller do. Set it as
    ``train.pre_epoch_process``; a loss with a warm-up that never got an epoch stops
    with a :class:`ConfigError` at its first step.

A YAML enables all of it with ``dependencies: [{name: mdistiller_blockkd.integrations.torchdistill}]``;
see the YAMLs in ``mdistiller_blockkd/integrations/configs/`` (shipped in the wheel) and the README.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Dict, List, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

try:
    from torchdistill.core.interfaces.pre_epoch_proc import default_pre_epoch_process_with_teacher
    from torchdistill.core.interfaces.registry import register_pre_epoch_proc_func
    from torchdistill.losses.registry import register_mid_level_loss
    from torchdistill.models.registry import register_auxiliary_model_wrapper, register_model
    from torchdistill.models.wrapper import AuxiliaryModelWrapper
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"mdistiller_blockkd.integrations.torchdistill needs torchdistill>=1.1 ({type(e).__name__}: {e}); "
        "install it with: pip install 'mdistiller_blockkd[torchdistill]'"
    ) from e

from ..distillers import losses
from ..distillers.blockkd import BlockKD
from ..distillers.blockkd_core import LossOptions, StepPlan, blockkd_loss
from ..config import CFG
from ..errors import ConfigError
from ..models import build_model
from ..models.staged import StagedModel
from ..plugin import as_staged

__all__ = ["CONFIG_DIR", "BlockKDOutput", "BlockKDTeacher", "BlockKDStudent", "BlockKDLoss", "DKDLoss",
           "blockkd_pre_epoch_process", "mdistiller_blockkd_model"]

#: Folder of the shipped torchdistill YAMLs (installed with the package):
#: ``torchdistill_ilsvrc2012_resnet34_resnet18_blockkd.yaml`` and ``torchdistill_blockkd_synthetic_cpu.yaml``.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: Teacher wrappers by ``link`` name (the student wrapper built next looks its teacher up here);
#: weak, so a finished run's teacher is not kept alive.
_TEACHERS: "weakref.WeakValueDictionary[str, BlockKDTeacher]" = weakref.WeakValueDictionary()


class BlockKDOutput(NamedTuple):
    """What :class:`BlockKDStudent` returns in training mode.

    ``logits`` (the student's) and ``stones`` (this step's stones' logits), and ``plan``, a
    ``(1, 2 + len(stones))`` tensor on their device: ``factor``, ``student_cross``, then
    the stones' ``weights``. ``weights[i]`` scales stone ``i``'s task and distill terms
    (stone weight times ``factor``: ``n/K`` for ``sample:K``, ``K`` for ``every:K`` with
    ``STONE_SCALE`` unbiased, else 1); ``student_cross`` scales the student's own cross
    term. A step of ``every:K`` without stones has none.

    Every field is a tensor or a list of tensors, so ``DataParallel`` (and torchdistill's
    I/O dict) can gather the replicas' outputs: logits and stones are concatenated along
    the batch, and ``plan`` gets one row per replica. The replicas of a step run the same
    stones (:meth:`~mdistiller_blockkd.distillers.base.SharedState.once_per_step`), so the
    rows are equal and the properties read the first.
    """

    logits: Tensor
    stones: List[Tensor]
    plan: Tensor

    @property
    def factor(self) -> Tensor:
        return self.plan[0, 0]

    @property
    def student_cross(self) -> Tensor:
        return self.plan[0, 1]

    @property
    def weights(self) -> List[Tensor]:
        return list(self.plan[0, 2:])


def _kwargs_error(owner: str, unknown, known) -> ConfigError:
    return ConfigError(f"{owner} got unknown kwargs {sorted(unknown)}; use {', '.join(sorted(known))}")


def _number(owner: str, name: str, value, positive: bool = False) -> float:
    """``value`` as a finite float, >= 0 (> 0 with ``positive``); else one :class:`ConfigError` line."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ConfigError(f"{owner} {name} is {value!r}; it must be a finite number {'> 0' if positive else '>= 0'}")
    return number


def _same_classes(owner: str, student: Tensor, teacher: Tensor) -> None:
    """Refuse student and teacher logits of different widths (models built for other numbers of classes)."""
    if student.shape[-1] != teacher.shape[-1]:
        raise ConfigError(
            f"{owner}: the student gives {student.shape[-1]} class scores but the teacher {teacher.shape[-1]}; build "
            "both models for the dataset's number of classes (models.*.kwargs.num_classes)")


def _logits(out) -> Tensor:
    """Logits from a model output: a tensor, ``(logits, feats)`` or a :class:`BlockKDOutput`."""
    if isinstance(out, BlockKDOutput):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _share_parameters(original: nn.Module, staged: nn.Module) -> None:
    """Make ``original`` use ``staged``'s parameter and buffer tensors (same state-dict keys),
    so training the staged copy trains the module the user passed."""
    mods = dict(original.named_modules())
    for name, p in staged.named_parameters():
        owner, _, attr = name.rpartition(".")
        mods[owner]._parameters[attr] = p
    for name, b in staged.named_buffers():
        owner, _, attr = name.rpartition(".")
        mods[owner]._buffers[attr] = b


@register_model(key="mdistiller_blockkd_model")
def mdistiller_blockkd_model(name: str, num_classes: int = 1000, pretrained=False, **kwargs) -> StagedModel:
    """torchdistill model factory: ``build_model(name, num_classes, pretrained, **kwargs)``."""
    return build_model(name, num_classes=num_classes, pretrained=pretrained, **kwargs)


@register_auxiliary_model_wrapper
class BlockKDTeacher(AuxiliaryModelWrapper):
    """Teacher side of Block-KD in torchdistill (``train.teacher.auxiliary_model_wrapper``).

    Adapts the teacher to a staged model (:func:`mdistiller_blockkd.plugin.as_staged`:
    torchvision ResNets, mdistiller's models, or this toolbox's), freezes it, and
    returns its logits; once the student wrapper exists, they come from the same
    BN-folded copy the stones run through.
    """

    def __init__(self, teacher_model: nn.Module, device=None, device_ids=None, distributed=False,
                 link: str = "blockkd", **kwargs):
        super().__init__()
        if kwargs:
            raise _kwargs_error("BlockKDTeacher", kwargs, ["link"])
        self.teacher = as_staged(teacher_model, "teacher")
        if device is not None:
            self.teacher.to(device)
        self.teacher.eval().requires_grad_(False)
        self.link = str(link)
        _TEACHERS[self.link] = self

    def train(self, mode: bool = True):
        self.training = mode  # the teacher stays in eval mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        student = self.__dict__.get("_student_wrapper")
        model = student.teacher_model(x) if student is not None else self.teacher
        return model(x)[0]


_STRUCTURAL = {"stones": "STONES", "connector": "CONNECTOR", "pairs": "PAIRS", "batch_stones": "BATCH_STONES",
               "stone_scale": "STONE_SCALE", "stone_weights": "STONE_WEIGHTS", "recompute": "RECOMPUTE",
               "save_masks": "SAVE_MASKS"}


@register_auxiliary_model_wrapper
class BlockKDStudent(BlockKD, AuxiliaryModelWrapper):
    """Student side of Block-KD in torchdistill (``train.student.auxiliary_model_wrapper``).

    This toolbox's :class:`BlockKD` whose teacher lives on the teacher side (the
    :class:`BlockKDTeacher` with the same ``link``): its submodules, hence its
    ``state_dict`` and what torchdistill's optimizer trains, are ``student`` and
    ``connectors``. A student that is not a staged model is adapted with
    :func:`as_staged` and keeps sharing its tensors with the adapted copy.
    """

    def __init__(self, student_model: nn.Module, device=None, device_ids=None, distributed=False,
                 link: str = "blockkd", fold_teacher_bn: bool = True, channels_last: bool = False, **kwargs):
        unknown = set(kwargs) - set(_STRUCTURAL)
        if unknown:
            raise _kwargs_error("BlockKDStudent", unknown, list(_STRUCTURAL) + ["link", "fold_teacher_bn", "channels_last"])
        teacher_side = _TEACHERS.get(str(link))
        if teacher_side is None:
            raise ConfigError(
                f"BlockKDStudent(link='{link}') found no BlockKDTeacher with that link; set "
                f"train.teacher.auxiliary_model_wrapper to {{key: BlockKDTeacher, kwargs: {{link: {link}}}}}")
        student = as_staged(student_model, "student")
        widths = [getattr(m.get_classifier(), "out_features", None) for m in (student, teacher_side.teacher)]
        if None not in widths and widths[0] != widths[1]:
            raise ConfigError(
                f"BlockKDStudent: the student classifies {widths[0]} classes but the teacher {widths[1]}; build both "
                "models for the dataset's number of classes (models.*.kwargs.num_classes)")
        if student is not student_model:
            _share_parameters(student_model, student)
        cfg = CFG.clone()
        cfg.defrost()
        for k, v in kwargs.items():
            cfg.BLOCKKD[_STRUCTURAL[k]] = v
        cfg.DISTILLER.FOLD_TEACHER_BN = bool(fold_teacher_bn)
        cfg.SOLVER.CHANNELS_LAST = bool(channels_last)
        super().__init__(student, teacher_side.teacher, cfg)
        # the teacher belongs to the teacher side: not saved, moved or trained from here
        teacher = self._modules.pop("teacher")
        object.__setattr__(self, "teacher", teacher)
        if device is not None:
            self.to(device)
        object.__setattr__(teacher_side, "_student_wrapper", self)

    def forward(self, x: Tensor):
        """Training: :class:`BlockKDOutput` for this step's stones; eval: the student's logits."""
        if not self.training:
            return self.student(x)[0]
        self._check_ddp()
        active, factor = self.planner.active(self)
        s_logits, outs = self._student_forward(x)
        stones = self._stone_logits(outs, active, self.teacher_model(x).staged_view())
        plan = [factor, factor if self.mode == "every" else 1.0] + [self.stone_weights[k] * factor for k in active]
        # pageable host -> device copy without waiting for the device
        plan = torch.tensor([plan], dtype=torch.float32).to(s_logits.device, non_blocking=True)
        return BlockKDOutput(s_logits, stones, plan)

    def _check_ddp(self) -> None:
        """Refuse DistributedDataParallel without ``find_unused_parameters`` when some connectors skip steps.

        torchdistill sets ``find_unused_parameters`` only when a student parameter is frozen;
        with ``sample:K`` / ``every:K`` DDP would fail at the second step instead.
        """
        ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)  # the DDP running this forward
        if (self.has_unused_parameters and ddp is not None and getattr(ddp, "module", None) is self
                and not ddp.find_unused_parameters):
            raise ConfigError(
                f"BlockKDStudent with stones '{self.mode}:{self.k}' leaves the connectors of the stones it skips "
                "without gradients on some steps, and DistributedDataParallel wraps it with "
                "find_unused_parameters False; set train.student.wrapper: {key: 'DistributedDataParallel', kwargs: "
                "{find_unused_parameters: True}} in the YAML (or use stones 'all' / 'last:K')")


class _EpochAware(nn.Module):
    """A loss term that reads its warm-up epoch from :func:`blockkd_pre_epoch_process`."""

    epoch = None
    warmup = 0.0

    def set_epoch(self, epoch) -> None:
        """The current epoch, 1-based (float allowed)."""
        self.epoch = epoch

    def current_epoch(self):
        if self.epoch is not None:
            return self.epoch
        if not self.warmup:
            return math.inf
        raise ConfigError(
            f"{type(self).__name__} has a {self.warmup:g}-epoch warm-up but was never given the epoch; set "
            "train.pre_epoch_process: 'blockkd_pre_epoch_process' (or warmup: 0)")

    @staticmethod
    def io(io_dict, path: str, io: str):
        try:
            return io_dict[path][io]
        except KeyError:
            raise ConfigError(f"no '{io}' recorded for module path '{path}' (known paths: {sorted(io_dict)})") from None


@register_mid_level_loss
class BlockKDLoss(_EpochAware):
    """Block-KD's loss, ``loss_ce + loss_kd + loss_cross`` of the core's :func:`~mdistiller_blockkd.distillers.blockkd_core.blockkd_loss`.

    Reads the student wrapper's :class:`BlockKDOutput` at ``student_module_path`` /
    ``student_module_io`` (default ``'.'`` / ``'output'``) and the teacher's logits at
    the teacher's path. Hyper-parameters and defaults are ``CFG.BLOCKKD``'s.
    """

    def __init__(self, alpha=None, beta=None, gamma=None, temperature=None, warmup=None, logit_loss=None,
                 dkd_alpha=None, dkd_beta=None, detach_ensemble=None, weight_cross=None,
                 student_module_path=".", student_module_io="output", teacher_module_path=".",
                 teacher_module_io="output", **kwargs):
        super().__init__()
        if kwargs:
            raise _kwargs_error("BlockKDLoss", kwargs, ["alpha", "beta", "gamma", "temperature", "warmup", "logit_loss",
                                                       "dkd_alpha", "dkd_beta", "detach_ensemble", "weight_cross",
                                                       "student_module_path", "student_module_io",
                                                       "teacher_module_path", "teacher_module_io"])
        #: the core's validated loss options: CFG.BLOCKKD's, with the YAML's kwargs in place
        self.opts = LossOptions.from_node(CFG.BLOCKKD, "BlockKDLoss", {"T": "temperature"}, alpha=alpha, beta=beta,
                                          gamma=gamma, T=temperature,
                                          warmup=warmup, logit_loss=logit_loss, dkd_alpha=dkd_alpha,
                                          dkd_beta=dkd_beta, detach_ensemble=detach_ensemble,
                                          weight_cross=weight_cross)
        self.warmup = self.opts.warmup
        self.paths = (student_module_path, student_module_io, teacher_module_path, teacher_module_io)

    def terms(self, student_io_dict, teacher_io_dict, targets) -> Dict[str, Tensor]:
        """``{"loss_ce", "loss_kd", "loss_cross"}`` as :class:`BlockKD` reports them."""
        sp, sio, tp, tio = self.paths
        out = self.io(student_io_dict, sp, sio)
        if not isinstance(out, BlockKDOutput):
            raise ConfigError(
                f"BlockKDLoss expects the student output to come from the BlockKDStudent auxiliary wrapper, got "
                f"{type(out).__name__}; set train.student.auxiliary_model_wrapper.key: BlockKDStudent")
        t_logits = _logits(self.io(teacher_io_dict, tp, tio))
        _same_classes("BlockKDLoss", out.logits, t_logits)
        cross = out.weights if self.opts.weight_cross else [out.factor] * len(out.stones)
        plan = StepPlan(list(range(len(out.stones))), out.weights, cross, out.student_cross)
        warm = losses.warmup_factor(self.current_epoch(), self.opts.warmup)
        return blockkd_loss(self.opts, out.logits, out.stones, t_logits, targets, plan, warm)

    def forward(self, student_io_dict, teacher_io_dict, targets, *args, **kwargs) -> Tensor:
        return sum(self.terms(student_io_dict, teacher_io_dict, targets).values())

    def extra_repr(self) -> str:
        o = self.opts
        return f"alpha={o.alpha}, beta={o.beta}, gamma={o.gamma}, T={o.T}, warmup={o.warmup}, logit_loss={o.logit_loss}"


@register_mid_level_loss
class DKDLoss(_EpochAware):
    """Decoupled KD (Zhao et al., CVPR 2022) as this toolbox's and mdistiller's ``DKD``:
    ``ce_weight * CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)``.

    Student and teacher outputs are read at the module paths (default the models' own
    outputs); plain logits and ``(logits, feats)`` tuples both work.
    """

    def __init__(self, ce_weight=None, alpha=None, beta=None, temperature=None, warmup=None,
                 student_module_path=".", student_module_io="output", teacher_module_path=".",
                 teacher_module_io="output", **kwargs):
        super().__init__()
        if kwargs:
            raise _kwargs_error("DKDLoss", kwargs, ["ce_weight", "alpha", "beta", "temperature", "warmup",
                                                   "student_module_path", "student_module_io",
                                                   "teacher_module_path", "teacher_module_io"])
        c = CFG.DKD

        def number(name, value, default, positive=False):
            return _number("DKDLoss", name, default if value is None else value, positive)

        self.ce_weight = number("ce_weight", ce_weight, c.CE_WEIGHT)
        self.alpha = number("alpha", alpha, c.ALPHA)
        self.beta = number("beta", beta, c.BETA)
        self.T = number("temperature", temperature, c.T, positive=True)
        self.warmup = number("warmup", warmup, c.WARMUP)
        self.paths = (student_module_path, student_module_io, teacher_module_path, teacher_module_io)

    def forward(self, student_io_dict, teacher_io_dict, targets, *args, **kwargs) -> Tensor:
        sp, sio, tp, tio = self.paths
        s = _logits(self.io(student_io_dict, sp, sio))
        t = _logits(self.io(teacher_io_dict, tp, tio))
        _same_classes("DKDLoss", s, t)
        warm = losses.warmup_factor(self.current_epoch(), self.warmup)
        return self.ce_weight * F.cross_entropy(s, targets) + warm * losses.dkd_loss(
            s, t, targets, self.alpha, self.beta, self.T)

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, alpha={self.alpha}, beta={self.beta}, T={self.T}, warmup={self.warmup}"


def _loss_terms(criterion: nn.Module):
    """Every module of a torchdistill criterion, including the sub-terms it keeps in ``term_dict``."""
    seen = []
    stack = [criterion]
    while stack:
        m = stack.pop()
        if not isinstance(m, nn.Module) or any(m is s for s in seen):
            continue
        seen.append(m)
        stack.extend(m.children())
        stack.extend(sub for sub, _ in getattr(m, "term_dict", {}).values())
        inner = getattr(m, "criterion", None)  # loss wrappers keep the wrapped loss here
        if isinstance(inner, nn.Module):
            stack.append(inner)
    return seen


@register_pre_epoch_proc_func
def blockkd_pre_epoch_process(self, epoch=None, **kwargs):
    """torchdistill's default pre-epoch process, then: a frozen teacher (``requires_grad: False``)
    goes to eval mode, as in mdistiller and this toolbox (torchdistill 1.1.5 leaves it in
    training mode, so its BatchNorms would use batch statistics), and the loss terms get
    ``set_epoch(epoch + 1)``.

    torchdistill's drivers pass the 0-based epoch (``start_epoch`` on resume); warm-ups
    here count from 1 like mdistiller's trainer.
    """
    default_pre_epoch_process_with_teacher(self, epoch=epoch, **kwargs)
    if not self.teacher_updatable:  # torchdistill leaves a frozen teacher in training mode (BN batch statistics)
        self.teacher_model.eval()
    current = 1 if epoch is None else epoch + 1
    for m in _loss_terms(self.criterion):
        if isinstance(m, _EpochAware):
            m.set_epoch(current)
