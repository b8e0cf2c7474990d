"""The distiller contract (mdistiller's API), shared by every method.

A distiller is an ``nn.Module`` built as ``Distiller(student, teacher, cfg, input_size=S)``
(the assembler, :func:`mdistiller_blockkd.engine.build.build_distiller`, passes
``input_size``, the side of the square input images; a distiller never reads
``DATASET.*``). ``cfg`` is required: a distiller reads its own node (``cfg.KD``...) and
``DISTILLER`` / ``SOLVER`` keys from it, never from the global ``CFG``. A class enters
``DISTILLER.TYPE`` with ``@register_distiller("NAME")`` (:mod:`mdistiller_blockkd.registry`),
here or in an outside package.

* ``forward_train(image, target, **kw) -> (student_logits, {name: loss})``; the trainer
  sums the loss values; ``kw`` carries ``epoch`` (1-based, float allowed).
* ``forward_test(image) -> student_logits``.
* ``get_learnable_parameters()``: student + method-specific modules (connectors...),
  never a teacher parameter. ``get_extra_parameters()``: how many of those are not
  the student's.
* ``train(mode)`` keeps the teacher in eval mode whatever ``mode`` is.
* ``eval_logits(image) -> {name: logits}``: extra heads scored during evaluation
  (Block-KD's stepping stones); empty by default.
* ``describe() -> str``: what was built, for the run's log (subclasses add lines).

The teacher is frozen at construction: ``eval()`` and ``requires_grad_(False)``.
Teacher outputs are computed by :meth:`Distiller.teacher_model`: a copy of the frozen
teacher with its BatchNorms folded into the convolutions (exact in eval mode, verified,
see :mod:`mdistiller_blockkd.models.fold`; ``DISTILLER.FOLD_TEACHER_BN``), else the
teacher itself.

DataParallel (mdistiller's ``tools/train.py`` always wraps the distiller in it) builds
shallow replicas at every forward: each replica gets a copy of the module's ``__dict__``,
so an attribute *assigned* on a replica is lost after the step. State that must outlive
a step therefore lives in :class:`SharedState` (``self._shared``), one plain object that
every replica references: the BN-folded teacher (one per device and dtype, folded once)
and method state such as Block-KD's ``sample:K`` deck, changed under its lock.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..models.fold import fold_frozen_bn
from ..models.staged import StagedModel
from ..registry import register_distiller


class SharedState:
    """State of one distiller that its DataParallel replicas share (see the module docstring).

    ``teacher_exec`` maps ``(device, dtype)`` to the module computing teacher outputs;
    ``values`` holds method state (a dict the method owns); ``lock`` (re-entrant)
    serialises changes made by replicas running in parallel threads. Deep copies and
    pickles get their own holder with copied ``values`` and an empty teacher cache.
    """

    def __init__(self, values=None):
        self.lock = threading.RLock()
        self.teacher_exec: Dict[tuple, Optional[nn.Module]] = {}
        self.values: dict = dict(values or {})

    def __getstate__(self):
        return {"values": self.values}

    def __setstate__(self, state):
        self.__init__(state["values"])

    def __deepcopy__(self, memo):
        import copy

        return SharedState(copy.deepcopy(self.values, memo))


def shared_attribute(key: str, factory, cast):
    """A distiller attribute stored in ``self._shared.values[key]`` (``factory()`` until set;
    assignments go through ``cast``), so DataParallel replicas read and advance the module's own."""

    def get(self):
        return self._shared.values.setdefault(key, factory())

    def set(self, value):
        self._shared.values[key] = cast(value)

    return property(get, set, doc=f"Shared across DataParallel replicas (``_shared.values[{key!r}]``).")


class Distiller(nn.Module):
    """Base class of every distiller (see the module docstring for the contract).

    Args:
        student: the model trained.
        teacher: the frozen teacher (``None`` for vanilla training).
        cfg: the run's config (required).
        input_size: side of the (square) input images, given by the assembler; ``None``
            when the method does not need it.
    """

    #: True when some learnable parameters may get no gradient in a step (for DDP).
    has_unused_parameters = False

    # -- what the tools know of a method (report, benchmark, study read these; see results.labels) --
    #: The config node of the method's own options (``"BLOCKKD"``), or None when it has none.
    config_node: str | None = None
    #: Keys of that node whose non-default value names a variant (``BLOCKKD.STONES`` -> ``BLOCKKD sample:1``).
    label_keys: tuple = ()
    #: Those of :attr:`label_keys` shown by their value alone (``sample:1``); others read ``NAME=value``.
    bare_label_keys: tuple = ()
    #: Hyper-parameters that name a variant only where a run differs from most runs of a report.
    hyper_keys: tuple = ()
    #: Position of the method in tables (lower first); outside methods come after the built-in ones.
    table_order: int = 100

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg, input_size: int | None = None):
        super().__init__()
        if cfg is None:
            raise TypeError(f"{type(self).__name__} needs the run's cfg (e.g. mdistiller_blockkd.config.load_cfg())")
        self._shared = SharedState()
        self.student = student
        self.teacher = teacher
        self.input_size = None if input_size is None else int(input_size)
        self.fold_teacher_bn = bool(cfg.DISTILLER.FOLD_TEACHER_BN)
        self.channels_last = bool(cfg.SOLVER.CHANNELS_LAST)
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    # -- contract -------------------------------------------------------------------
    @classmethod
    def check_cfg(cls, cfg) -> None:
        """Validate this method's options in ``cfg`` before anything is built or read.

        Raises :class:`~mdistiller_blockkd.errors.ConfigError`; the default checks nothing.
        """

    def train(self, mode: bool = True):
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for name, module in self.named_children():
            module.train(mode and name != "teacher")
        return self

    def get_learnable_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("teacher.")]

    def get_extra_parameters(self) -> int:
        student = {id(p) for p in self.student.parameters()}
        return sum(p.numel() for p in self.get_learnable_parameters() if id(p) not in student)

    def forward_train(self, image: Tensor, target: Tensor, **kwargs):
        raise NotImplementedError

    def forward_test(self, image: Tensor) -> Tensor:
        return self.student(image)[0]

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])

    def eval_logits(self, image: Tensor) -> Dict[str, Tensor]:
        return {}

    def describe(self) -> str:
        """One line naming the method, the student, the teacher and the extra learnable parameters."""
        parts = [f"{type(self).__name__}: student {type(self.student).__name__}"]
        if self.teacher is not None:
            parts.append(f"teacher {type(self.teacher).__name__}")
        parts.append(f"extra parameters {self.get_extra_parameters() / 1e6:.3f}M")
        return ", ".join(parts)

    # -- helpers for subclasses -----------------------------------------------------
    def teacher_model(self, x: Tensor) -> nn.Module:
        """The module that computes teacher outputs for inputs like ``x``.

        A BN-folded copy of the frozen teacher, built on first use for ``x``'s device and
        dtype (once for all DataParallel replicas: it is kept in ``self._shared``) and
        rebuilt after ``load_state_dict`` / ``.to()``; the teacher itself when folding is
        off, impossible, or changes any output. Never registered as a submodule, so it is
        neither saved nor counted. The copy is channels-last on CPU (measured faster for
        every CIFAR teacher, forward and input-gradient backward) and with
        ``SOLVER.CHANNELS_LAST``.
        """
        key = (x.device, x.dtype)
        shared = self._shared
        if key not in shared.teacher_exec:
            with shared.lock:  # replicas on other devices wait; each (device, dtype) is folded once
                if key not in shared.teacher_exec:
                    shared.teacher_exec[key] = self._fold_teacher(x)
        folded = shared.teacher_exec[key]
        return self.teacher if folded is None else folded

    def _fold_teacher(self, x: Tensor):
        """The BN-folded teacher for inputs like ``x``, or None (use the teacher itself)."""
        if not (self.fold_teacher_bn and isinstance(self.teacher, StagedModel)):
            return None
        with torch.autocast(x.device.type, enabled=False):
            folded = fold_frozen_bn(self.teacher, x[:2].detach().float())
        if folded is not None and (x.device.type == "cpu" or self.channels_last):
            folded = folded.to(memory_format=torch.channels_last)
        return folded

    def _invalidate_teacher_cache(self):
        shared = self.__dict__.get("_shared")
        if shared is not None:
            with shared.lock:
                shared.teacher_exec.clear()

    def _apply(self, fn, *args, **kwargs):
        self._invalidate_teacher_cache()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._invalidate_teacher_cache()
        return super().load_state_dict(*args, **kwargs)

    @torch.no_grad()
    def teacher_forward(self, image: Tensor):
        """The teacher's ``(logits, feats)``, computed once per step without autograd."""
        return self.teacher_model(image)(image)


@register_distiller("NONE")
class Vanilla(Distiller):
    """``NONE``: plain training of the student with cross-entropy."""

    table_order = 0

    def __init__(self, student, teacher, cfg, **kwargs):
        super().__init__(student, None, cfg, **kwargs)

    def forward_train(self, image, target, **kwargs):
        logits, _ = self.student(image)
        return logits, {"loss_ce": nn.functional.cross_entropy(logits, target)}
