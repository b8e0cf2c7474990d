"""Where a distillation step's time goes: ``torch.profiler`` time split into the parts of a step.

Parts (forward and backward of each, where it has one):

``student``     the student's modules (stem, blocks, head);
``teacher``     the teacher's modules run without autograd (its own logits ``Y^T``);
``stones``      the teacher's modules run *with* autograd: the stepping stones' passes
                through the frozen teacher blocks and head (backward: input gradients only);
``connectors``  Block-KD's connectors;
``losses``      everything else inside ``forward_train`` (the logit distances, the
                ensemble, the sums) and its backward;
``optimizer``   ``optimizer.step`` and ``zero_grad``;
``backward other``  autograd's own work not tied to a forward op (gradient accumulation
                into ``.grad``, the seed gradient).

A forward op is given to a part by the modules it ran in (forward hooks open a
``record_function`` scope per part; the teacher's modules are one part or the other
by whether autograd was on). A backward op is given to the part of the forward op that
created it, through the autograd sequence number both carry. Times are the profiled
ops' self CPU times, so they add up to the profiled step; the profiler's own overhead
inflates small ops, so compare shares and ratios, not absolute times, with an
unprofiled benchmark.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.autograd.profiler import record_function

__all__ = ["PARTS", "profile_step", "attribute", "saved_tensor_bytes"]

PARTS = ("student", "teacher", "stones", "connectors", "losses", "optimizer", "backward other")
_SCOPE = "part:"
_EVAL = "autograd::engine::evaluate_function: "


class _PartHooks:
    """Forward hooks that open one ``record_function('part:<name>')`` scope per outermost module call."""

    def __init__(self):
        self.handles = []
        self.stack: List[object] = []  # open record_function scopes
        self.depth = 0
        self.wrapped: List[tuple] = []  # (model, method name) set on the instance
        self.part: Optional[str] = None  # the part whose modules run now (None: outside every part)

    def add(self, modules: Iterable[nn.Module], part: Callable[[], str]):
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, part=part: self._enter(part())))
            self.handles.append(m.register_forward_hook(lambda mod, args, out: self._exit()))

    def wrap(self, model: nn.Module, part: Callable[[], str]):
        """Scope a staged model's ``forward_stem`` / ``forward_block`` / ``forward_head`` (the functional
        ops between its submodules included); other models get module hooks on every submodule."""
        names = [n for n in ("forward_stem", "forward_block", "forward_head") if callable(getattr(model, n, None))]
        if len(names) < 3:
            self.add(model.modules(), part)
            return
        for n in names:
            fn = getattr(model, n)

            def scoped(*args, _fn=fn, **kwargs):
                self._enter(part())
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self._exit()
            setattr(model, n, scoped)
            self.wrapped.append((model, n))

    def _enter(self, part: str):
        if self.depth == 0:
            scope = record_function(_SCOPE + part)
            scope.__enter__()
            self.stack.append(scope)
            self.part = part
        self.depth += 1

    def _exit(self):
        self.depth -= 1
        if self.depth == 0:
            self.stack.pop().__exit__(None, None, None)
            self.part = None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        for model, n in self.wrapped:
            delattr(model, n)  # the class's method again
        self.wrapped = []


def _part_of(event) -> Optional[str]:
    """The ``part:`` scope nearest above ``event`` (itself included), or None."""
    e = event
    while e is not None:
        if e.name.startswith(_SCOPE):
            return e.name[len(_SCOPE):]
        e = e.cpu_parent
    return None


def _eval_ancestor(event):
    e = event
    while e is not None:
        if e.name.startswith(_EVAL):
            return e
        if e.name.startswith(_SCOPE):
            return None
        e = e.cpu_parent
    return None


def attribute(events) -> Dict[str, float]:
    """``{"<part> forward" | "<part> backward" | "optimizer" | "backward other": microseconds}`` of profiled events."""
    fwd_part: Dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(_EVAL) and not e.name.endswith("Backward0"):
            part = _part_of(e)
            if part not in (None, "backward", "optimizer"):
                fwd_part.setdefault(e.sequence_nr, "losses" if part == "forward" else part)
    out: Dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith(_SCOPE):
            continue
        part = _part_of(e)
        if part is None:
            continue
        t = float(e.self_cpu_time_total)
        if part == "optimizer":
            out["optimizer"] += t
        elif part == "backward":
            node = _eval_ancestor(e)
            src = fwd_part.get(node.sequence_nr) if node is not None and node.sequence_nr >= 0 else None
            out[f"{src} backward" if src else "backward other"] += t
        else:
            out[f"{'losses' if part == 'forward' else part} forward"] += t
    return dict(out)


def _scoped(distiller: nn.Module, teacher_exec: Optional[nn.Module]) -> _PartHooks:
    hooks = _PartHooks()
    hooks.wrap(distiller.student, lambda: "student")
    connectors = getattr(distiller, "connectors", None)
    if isinstance(connectors, nn.Module):
        hooks.add(connectors.modules(), lambda: "connectors")
    if teacher_exec is not None:
        hooks.wrap(teacher_exec, lambda: "stones" if torch.is_grad_enabled() else "teacher")
    return hooks


def saved_tensor_bytes(forward: Callable[[], object], distiller: nn.Module, teacher_exec: Optional[nn.Module]) -> Dict[str, dict]:
    """What autograd keeps for backward in one ``forward()`` call, per part (see the module docstring).

    Returns ``{part: {"bytes": activations saved, "param_bytes": parameters saved, "tensors": count}}``
    for the parts ``student``, ``stones`` (the teacher's modules with autograd on), ``connectors``
    and ``losses`` (everything else in the forward). A storage saved twice counts once, in the part
    that saved it first; parameters (the weights every step keeps anyway) are counted apart.
    """
    hooks = _scoped(distiller, teacher_exec)
    params = {p.untyped_storage().data_ptr() for m in (distiller, teacher_exec) if m is not None for p in m.parameters()}
    seen = set()
    out: Dict[str, dict] = defaultdict(lambda: {"bytes": 0, "param_bytes": 0, "tensors": 0})
    keep = []  # the saved tensors stay alive until the forward's graph is dropped, so no data_ptr is reused

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen and t.device.type != "meta":
            seen.add(ptr)
            row = out[hooks.part or "losses"]
            row["param_bytes" if ptr in params else "bytes"] += storage.nbytes()
            row["tensors"] += 1
        keep.append(t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = forward()
    finally:
        hooks.remove()
    del result
    keep.clear()
    return {k: dict(v) for k, v in out.items()}


def profile_step(step_parts: Callable[[], None], distiller: nn.Module, teacher_exec: Optional[nn.Module],
                 steps: int = 3) -> Dict[str, float]:
    """Mean milliseconds per step of each part over ``steps`` profiled calls of ``step_parts``.

    ``step_parts()`` runs one training step with its forward, backward and optimizer work
    inside ``record_function('part:forward' | 'part:backward' | 'part:optimizer')`` scopes.
    ``teacher_exec`` is the module that computes the teacher (the BN-folded copy, see
    ``Distiller.teacher_model``), or None for a distiller without a teacher.
    """
    hooks = _scoped(distiller, teacher_exec)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step_parts()
    finally:
        hooks.remove()
    totals = attribute(prof.events())
    return {k: v / 1000.0 / steps for k, v in totals.items()}
