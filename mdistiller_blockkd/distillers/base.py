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
so an attribute *assigned* on a replica is lost after the step, and every plain
(non-module, non-tensor) attribute is *shared* by all replicas. So a forward reaches
modules and tensors only through registered submodules (``self.student``...: the
replica's own, on the replica's device), never through a plain attribute that holds a
module. State that must outlive a step lives in :class:`SharedState` (``self._shared``),
one plain object that every replica references: the module computing teacher outputs
(one per device and dtype, built from the replica's own teacher) and method state such
as Block-KD's ``sample:K`` walk, changed under its lock. The replicas of one
DataParallel step share one *step*: :meth:`SharedState.once_per_step` runs a draw once
for all of them, so they agree on it, and the draw state advances once per step, as
without DataParallel.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..models.fold import try_fold_frozen_bn
from ..models.staged import StagedModel
from ..registry import register_distiller


class SharedState:
    """State of one distiller that its DataParallel replicas share (see the module docstring).

    ``teacher_exec`` maps ``(device, dtype)`` to the module computing teacher outputs
    (``None``: the calling replica's own teacher); ``fold_notes`` maps the same keys to
    ``(folded, note)``, what folding the teacher's BatchNorms did; ``values`` holds method
    state (a dict the method owns); ``lock`` (re-entrant) serialises changes made by
    replicas running in parallel threads. Deep copies and pickles get their own holder
    with copied ``values`` and empty caches.
    """

    def __init__(self, values=None):
        self.lock = threading.RLock()
        self.teacher_exec: Dict[tuple, Optional[nn.Module]] = {}
        self.fold_notes: Dict[tuple, tuple] = {}
        self.fold_warned = False
        self.values: dict = dict(values or {})
        # DataParallel steps: replicas made by one replicate() call form one step (see once_per_step)
        self.step_group = 0
        self.step_group_ran = False
        self.step_result: tuple = (None, None)

    def __getstate__(self):
        return {"values": self.values}

    def __setstate__(self, state):
        self.__init__(state["values"])

    def __deepcopy__(self, memo):
        return SharedState(copy.deepcopy(self.values, memo))

    def new_replica_group(self) -> int:
        """The step of a replica being made now: the current one until a replica of it has run
        :meth:`once_per_step` (DataParallel makes every replica of a step before running any)."""
        with self.lock:
            if self.step_group_ran:
                self.step_group, self.step_group_ran = self.step_group + 1, False
            return self.step_group

    def once_per_step(self, module: nn.Module, draw: Callable[[], object]):
        """``draw()`` once per training step: the replicas of one DataParallel step get the first
        replica's result; the module itself (no DataParallel, or one device) draws on every call."""
        group = module.__dict__.get("_replica_group")
        with self.lock:
            if group is None:
                return draw()
            if group == self.step_group:
                self.step_group_ran = True
            if self.step_result[0] != group:
                self.step_result = (group, draw())
            return self.step_result[1]


def _no_autocast(device_type: str):
    """Autocast off inside, on device types that have it (``meta`` has none; torch < 2.4 cannot tell)."""
    available = getattr(torch.amp, "is_autocast_available", lambda _: True)(device_type)
    return torch.autocast(device_type, enabled=False) if available else contextlib.nullcontext()


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
        dtype (once for all DataParallel replicas: it is kept in ``self._shared``, built
        from the first replica's own teacher on that device) and rebuilt after
        ``load_state_dict`` / ``.to()``; the teacher itself when folding is off, impossible,
        or changes any output. A teacher that is not on ``x``'s device (one DataParallel
        does not replicate: torchdistill's student wrapper keeps it outside its module tree)
        is copied there first. Never registered as a submodule, so it is neither saved nor
        counted. The copy is channels-last on CPU (measured faster for every CIFAR teacher,
        forward and input-gradient backward) and with ``SOLVER.CHANNELS_LAST``.
        """
        key = (x.device, x.dtype)
        shared = self._shared
        if key not in shared.teacher_exec:
            with shared.lock:  # replicas on other devices wait; each (device, dtype) is folded once
                if key not in shared.teacher_exec:
                    shared.teacher_exec[key] = self._build_teacher_exec(x)
        built = shared.teacher_exec[key]
        return self.teacher if built is None else built

    @property
    def teacher_folded(self) -> Optional[bool]:
        """Whether the teacher runs BN-folded: ``None`` before its first use (or without a teacher,
        or with ``DISTILLER.FOLD_TEACHER_BN`` off), else True when every device's copy is folded."""
        notes = list(self._shared.fold_notes.values())
        return all(folded for folded, _ in notes) if notes else None

    def _teacher_on(self, device: torch.device) -> Optional[nn.Module]:
        """A copy of the teacher on ``device`` when some of its tensors are elsewhere, else ``None``.

        A DataParallel replica's registered teacher is on the replica's device already (its
        parameters are plain attributes there, so ``parameters()`` is empty; its buffers are not).
        """
        tensors = itertools.chain(self.teacher.parameters(), self.teacher.buffers())
        if all(t.device == device for t in tensors):
            return None
        return copy.deepcopy(self.teacher).to(device)

    def _build_teacher_exec(self, x: Tensor) -> Optional[nn.Module]:
        """The module computing teacher outputs for inputs like ``x`` (``None``: ``self.teacher``)."""
        if self.teacher is None:
            return None
        moved = self._teacher_on(x.device)
        teacher = self.teacher if moved is None else moved
        if not (self.fold_teacher_bn and isinstance(teacher, StagedModel)):
            return moved
        with _no_autocast(x.device.type):  # the fold and its check in float32
            folded, note = try_fold_frozen_bn(teacher, x[:2].detach().float())
        if note:  # nothing to fold leaves no note
            self._shared.fold_notes[(x.device, x.dtype)] = (folded is not None, note)
        if folded is None:
            if note and not self._shared.fold_warned:
                self._shared.fold_warned = True
                warnings.warn(f"{type(self).__name__}: the teacher runs without BatchNorm folding ({note}); "
                              "the losses are the same, the steps slower (DISTILLER.FOLD_TEACHER_BN False turns folding off)",
                              stacklevel=3)
            return moved
        if x.device.type == "cpu" or self.channels_last:
            folded = folded.to(memory_format=torch.channels_last)
        return folded

    def _replicate_for_data_parallel(self):
        """A DataParallel replica, tagged with its step (see :meth:`SharedState.once_per_step`)."""
        replica = super()._replicate_for_data_parallel()
        replica.__dict__["_replica_group"] = self._shared.new_replica_group()
        return replica

    def _invalidate_teacher_cache(self):
        shared = self.__dict__.get("_shared")
        if shared is not None:
            with shared.lock:
                shared.teacher_exec.clear()
                shared.fold_notes.clear()

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
