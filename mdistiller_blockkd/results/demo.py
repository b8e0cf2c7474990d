"""The demo's library: its stages, their overrides and state (what ``--resume`` keeps), running them, and
their results (table, teacher check, plots).

The demo command (:mod:`mdistiller_blockkd.cli.demo`) documents the behaviour: four stages
(:data:`STAGES`), each a run of the train command in ``<out>/runs/<stage>/``, read back and
tabled as the report command does (:mod:`.runs`, :mod:`.tables`, :mod:`.plots`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import yaml

from ..errors import UserError
from ..utils.fileio import atomic_write_text
from ..utils.runfolder import run_finished
from .labels import label_keys
from .plots import import_pyplot, write_plots
from .runs import CONFIG, METRICS, Run, group_runs, load_run
from .tables import summary_table

#: The teacher must beat the vanilla student by at least this many points (best top-1).
TEACHER_MARGIN = 1.0
#: ``--quick``: overrides of every stage (1 epoch: 2 steps of 64, 100 test images).
QUICK_OVERRIDES = ["DATASET.TRAIN_SUBSET", "128", "DATASET.TEST_SUBSET", "100"]
#: File in a student stage's folder recording the sha256 of the teacher file it learnt from.
TEACHER_MARK = "demo_teacher.sha256"
RUNS = "runs"  # EXPERIMENT.PROJECT of every demo config


@dataclass(frozen=True)
class Stage:
    """One demo stage: its name (= ``EXPERIMENT.NAME``), shipped config (short name) and table label."""

    name: str
    yaml: str
    label: str
    needs_teacher: bool


STAGES = (
    Stage("teacher", "demo/teacher", "teacher (vanilla)", False),
    Stage("vanilla", "demo/vanilla", "student vanilla", True),
    Stage("kd", "demo/kd", "student KD", True),
    Stage("blockkd", "demo/blockkd", "student Block-KD", True),
)


# -- configuration ------------------------------------------------------------------
def scale_decay(stages: Sequence[int], old_epochs: int, new_epochs: int) -> List[int]:
    """Learning-rate decay epochs of a ``old_epochs`` recipe moved to ``new_epochs`` (same fractions).

    Stages that would fall outside ``1 .. new_epochs - 1`` are dropped; duplicates merge.
    """
    if new_epochs == old_epochs:
        return list(stages)
    out = {round(s * new_epochs / old_epochs) for s in stages}
    return sorted(s for s in out if 1 <= s < new_epochs)


def run_dir(out: str, stage: Stage) -> str:
    """``<out>/runs/<stage>``: where a stage writes."""
    return os.path.join(out, RUNS, stage.name)


def teacher_file(out: str) -> str:
    """The teacher weights the students read: the teacher stage's ``student_best``."""
    return os.path.join(run_dir(out, STAGES[0]), "student_best")


def stage_overrides(stage: Stage, args: argparse.Namespace) -> List[str]:
    """``KEY VALUE`` overrides of ``stage``: output folder, seed, epochs, teacher file, ``--quick``, user opts."""
    from ..config import load_cfg

    base = load_cfg(stage.yaml)
    opts = ["LOG.PREFIX", args.out, "EXPERIMENT.PROJECT", RUNS, "EXPERIMENT.NAME", stage.name,
            "EXPERIMENT.SEED", str(args.seed)]
    epochs = args.epochs if stage.needs_teacher else args.teacher_epochs
    if epochs is not None:
        decay = scale_decay(list(base.SOLVER.LR_DECAY_STAGES), int(base.SOLVER.EPOCHS), epochs)
        opts += ["SOLVER.EPOCHS", str(epochs), "SOLVER.LR_DECAY_STAGES", str(decay)]
    if stage.needs_teacher:
        opts += ["DISTILLER.TEACHER_CKPT", teacher_file(args.out)]
    if args.quick:
        opts += QUICK_OVERRIDES
    return opts + list(args.opts)


def stage_cfg(stage: Stage, opts: Sequence[str]):
    """The merged, frozen config of ``stage`` with ``opts``."""
    from ..config import load_cfg

    return load_cfg(stage.yaml, list(opts))


# -- stage state --------------------------------------------------------------------
def file_sha256(path: str) -> Optional[str]:
    """Hex sha256 of a file's bytes, or None when it does not exist."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def latest_epoch(folder: str) -> int:
    """The epoch the run's ``latest`` checkpoint is at (0 when there is none or it cannot be read)."""
    path = os.path.join(folder, "latest")
    if not os.path.isfile(path):
        return 0
    from ..utils.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except UserError:
        return 0
    epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    return int(epoch) if isinstance(epoch, int) else 0


def same_config(folder: str, cfg) -> bool:
    """True when ``folder/config.yaml`` holds exactly ``cfg`` (the run was made with these settings); the run
    recorded what ``SOLVER.AMP auto`` chose, so ``cfg`` is compared with that resolved."""
    from ..utils.precision import resolve_config_amp

    cfg = cfg.clone()
    resolve_config_amp(cfg)
    path = os.path.join(folder, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            saved = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8 text
        return False
    return saved == yaml.safe_load(cfg.dump())


def plan_stage(stage: Stage, cfg, out: str, resume: bool) -> tuple:
    """``(action, reason)`` for a stage: action ``skip`` (finished), ``resume`` or ``fresh``."""
    if not resume:
        return "fresh", ""
    folder = run_dir(out, stage)
    done = latest_epoch(folder)
    if done == 0:
        return "fresh", "no finished epoch yet"
    if not same_config(folder, cfg):
        return "fresh", "its config.yaml differs from this demo's settings"
    if stage.needs_teacher:
        mark = os.path.join(folder, TEACHER_MARK)
        saved = open(mark, encoding="utf-8").read().strip() if os.path.isfile(mark) else None
        if saved != file_sha256(teacher_file(out)):
            return "fresh", "it was trained from another teacher"
    if run_finished(folder, int(cfg.SOLVER.EPOCHS)):  # else a resume writes what is missing (an epoch's record)
        return "skip", f"finished ({done} epochs)"
    return "resume", f"continuing after epoch {done}"


# -- running ------------------------------------------------------------------------
def run_stage(stage: Stage, opts: Sequence[str], action: str, out: str, verbose: bool,
              train_main: Callable[[List[str]], object]) -> None:
    """Train ``stage`` through ``train_main``, the train command's ``main`` (given by the demo command:
    this layer does not import the commands), with ``--resume``, or afresh with ``--overwrite``."""
    folder = run_dir(out, stage)
    if stage.needs_teacher:  # which teacher these students learn from (checked by --resume)
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(os.path.join(folder, TEACHER_MARK), (file_sha256(teacher_file(out)) or "") + "\n")
    argv = (["--cfg", stage.yaml] + (["--resume"] if action == "resume" else ["--overwrite"])
            + ([] if verbose else ["--brief"]) + list(opts))
    train_main(argv)


# -- results ------------------------------------------------------------------------
def stage_runs(out: str) -> List[Optional[Run]]:
    """Each stage's run (read as the report reads runs), in stage order; None for a stage not run yet."""
    runs: List[Optional[Run]] = []
    for stage in STAGES:
        folder = run_dir(out, stage)
        started = all(os.path.isfile(os.path.join(folder, name)) for name in (METRICS, CONFIG))
        runs.append(load_run(folder, label_keys()) if started else None)
    return runs


def teacher_check(teacher_best: Optional[float], vanilla_best: Optional[float],
                  margin: float = TEACHER_MARGIN) -> tuple:
    """``(ok, message)``: does the teacher beat the vanilla student by at least ``margin`` points?"""
    if teacher_best is None or vanilla_best is None:
        return False, "WARNING: teacher or vanilla student has no result yet; the teacher check could not be made."
    gap = teacher_best - vanilla_best
    if gap >= margin:
        return True, (f"check passed: the teacher ({teacher_best:.2f}%) beats the vanilla student "
                      f"({vanilla_best:.2f}%) by {gap:.2f} points (>= {margin:g}).")
    return False, (f"WARNING: the teacher ({teacher_best:.2f}%) does NOT beat the vanilla student "
                   f"({vanilla_best:.2f}%) by {margin:g} point(s) (gap {gap:+.2f}); the KD and Block-KD rows "
                   "do not show what distillation can do here. Train the teacher longer (--teacher-epochs) or use a "
                   "stronger teacher before comparing methods.")


def make_plots(out: str, runs: Sequence[Optional[Run]]) -> str:
    """Write the report's plots of the demo runs to ``<out>/plots``; return a line saying what happened."""
    try:
        plt = import_pyplot()
    except UserError:
        return "plots: skipped (matplotlib is not installed; `pip install matplotlib` to get them)"
    done = [r for r in runs if r is not None]
    if not done:
        return "plots: skipped (no run with results)"
    return "plots: " + ", ".join(write_plots(group_runs(done), os.path.join(out, "plots"), plt))


def results_text(out: str, runs: Sequence[Optional[Run]], data_line: str, quick: bool) -> tuple:
    """``(text, ok, check)`` of the stages' ``runs`` (:func:`stage_runs`): the report (data line, table,
    teacher check, where the runs are), whether the teacher check passed, and its message."""
    teacher, vanilla = runs[0], runs[1]
    ok, check = teacher_check(teacher.best if teacher else None, vanilla.best if vanilla else None)
    text = [
        "## Demo results" + (" (--quick smoke run: numbers mean nothing)" if quick else ""),
        "",
        f"data: {data_line}",
        "",
        summary_table([(stage.label, run) for stage, run in zip(STAGES, runs)]),
        "",
        "best/last top-1: the student's test accuracy at its best / final epoch; train time: all epochs "
        "including evaluation; ms/step: median over epochs of the training time per step.",
        "",
        check,
        "",
        f"runs: {os.path.join(out, RUNS)}/<teacher|vanilla|kd|blockkd> (metrics.jsonl, worklog.txt, checkpoints)",
    ]
    return "\n".join(text) + "\n", ok, check
