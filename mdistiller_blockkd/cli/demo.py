"""The toolbox's demo: teacher, then vanilla / KD / Block-KD students, one command, offline.

    mdistiller-blockkd-demo [--out DIR] [--epochs N] [--seed S] [--resume] [--quick] [--threads N]

(also ``python -m mdistiller_blockkd demo`` and, in a checkout, ``python tools/demo.py``.)

Four stages, each a real run of the trainer (the train command's ``main``, called in
this process with the stage's YAML and overrides), on the Fashion-MNIST subset shipped with
the package (``DATASET.ROOT embedded``: 3000 training / 1000 test images, class-balanced;
no download):

1. ``teacher``  -- vanilla training of the teacher       (config ``demo/teacher``)
2. ``vanilla``  -- vanilla training of the student        (config ``demo/vanilla``)
3. ``kd``       -- KD from the stage-1 teacher            (config ``demo/kd``)
4. ``blockkd``  -- Block-KD from the stage-1 teacher      (config ``demo/blockkd``)

Pair and recipe (measured on 2 CPU cores; see the configs): teacher resnet32 (0.47M
parameters) for 15 epochs, students resnet8 (0.08M) for 10 epochs; SGD batch 64, LR 0.05
decayed x0.1 near the end, weight decay 5e-4; KD and Block-KD at T 4. The three students
share architecture, recipe and seed; they read the teacher's ``student_best``. About 8-10
minutes in all (Block-KD is the slowest stage: its table's ms/step column gives its cost against KD's). Each stage writes ``<out>/runs/<stage>/`` (``metrics.jsonl``,
``worklog.txt``, ``config.yaml``, checkpoints, tensorboard events; see
``mdistiller_blockkd.engine.trainer``). At the end the demo prints a table (best and
last-epoch top-1, training time, ms per step; for Block-KD the last epoch's stepping-stone
and teacher accuracies), writes it to ``<out>/demo_results.md`` and plots to ``<out>/plots/``
(read, tabled and plotted by :mod:`mdistiller_blockkd.results`, as the report command does;
matplotlib is a dependency). It checks that the
teacher beats the vanilla student by at least 1 point (best top-1) and prints a WARNING
when it does not: a teacher worse than its student makes the distillation comparison
meaningless.

Options
    ``--out DIR``     output folder (default ``output/demo``; ``output/demo_quick`` with ``--quick``)
    ``--epochs N``    epochs of the three students (learning-rate decay epochs scaled to match)
    ``--teacher-epochs N``  epochs of the teacher (decay scaled likewise)
    ``--seed S``      ``EXPERIMENT.SEED`` of every stage (default 0)
    ``--resume``      keep finished stages (same config, same teacher), continue interrupted
                      ones from their ``latest`` checkpoint, start the others; after a complete
                      run it only prints the table. Without it every stage starts afresh.
    ``--quick``       1 epoch on 128 training / 100 test images (a smoke test, seconds)
    ``--threads N``   torch CPU threads (default: torch's choice, one per core). The demo sets
                      ``OMP_WAIT_POLICY=PASSIVE`` (unless set already): with spinning OpenMP
                      threads a CPU shared with other busy processes slows training ~10x.
    ``--verbose``     also echo each stage's full config dump
    ``KEY VALUE ...`` trailing overrides applied to every stage (e.g. ``SOLVER.AMP bf16``)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

# OpenMP threads that wait passively: on a CPU shared with other busy processes, spinning
# threads make torch's CPU kernels up to ~10x slower (measured on 2 shared cores); when the
# CPU is free the cost is small. Set before torch is imported; a user's own value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import yaml  # noqa: E402

from ..errors import ConfigError, UserError, run_cli  # noqa: E402
from ..results.labels import label_keys  # noqa: E402
from ..results.plots import import_pyplot, write_plots  # noqa: E402
from ..results.runs import CONFIG, METRICS, Run, group_runs, load_run  # noqa: E402
from ..results.tables import summary_table  # noqa: E402
from ..utils.fileio import atomic_write_text, check_output_path  # noqa: E402
from ..utils.runfolder import run_finished  # noqa: E402

DEFAULT_OUT = os.path.join("output", "demo")
QUICK_OUT = os.path.join("output", "demo_quick")
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
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the demo's command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="mdistiller-blockkd-demo",
        description="Train a teacher, then vanilla, KD and Block-KD students on the embedded Fashion-MNIST "
                    "subset (offline), and print the comparison.",
        epilog="Example: mdistiller-blockkd-demo            (about 10 minutes on a 2-core CPU)\n"
               "         mdistiller-blockkd-demo --resume   (continue an interrupted demo / print the table)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", metavar="DIR", help=f"output folder (default {DEFAULT_OUT}; {QUICK_OUT} with --quick)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs of the three student stages (default: their configs')")
    p.add_argument("--teacher-epochs", type=int, metavar="N", help="epochs of the teacher stage (default: its config's)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="EXPERIMENT.SEED of every stage (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="skip finished stages and continue interrupted ones instead of starting afresh")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke version: 1 epoch (unless --epochs / --teacher-epochs say otherwise) on 128/100 images")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--verbose", action="store_true", help="echo the full config dump of every stage")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="config overrides applied to every stage, e.g. SOLVER.AMP bf16")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    for flag in ("--resume", "--quick", "--verbose"):  # switches are also accepted after the overrides
        if flag in args.opts:
            args.opts = [o for o in args.opts if o != flag]
            setattr(args, flag[2:], True)
    misplaced = [o for o in args.opts[::2] if str(o).startswith("--")]
    if misplaced:
        raise ConfigError(f"option {misplaced[0]} after the KEY VALUE overrides; put options before them")
    for name in ("epochs", "teacher_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} is {value}; give 1 or more")
    if args.threads < 0:
        raise ConfigError(f"--threads is {args.threads}; give 0 (torch's choice) or more")
    if len(args.opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {' '.join(args.opts)}")
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    check_output_path(args.out, "--out", folder=True)
    if args.quick:
        args.epochs = 1 if args.epochs is None else args.epochs
        args.teacher_epochs = 1 if args.teacher_epochs is None else args.teacher_epochs
    return args


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
    """True when ``folder/config.yaml`` holds exactly ``cfg`` (the run was made with these settings)."""
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
def run_stage(stage: Stage, opts: Sequence[str], action: str, out: str, verbose: bool) -> None:
    """Train ``stage`` through the train command's ``main`` (``--resume``, or afresh with ``--overwrite``)."""
    folder = run_dir(out, stage)
    if stage.needs_teacher:  # which teacher these students learn from (checked by --resume)
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(os.path.join(folder, TEACHER_MARK), (file_sha256(teacher_file(out)) or "") + "\n")
    argv = (["--cfg", stage.yaml] + (["--resume"] if action == "resume" else ["--overwrite"])
            + ([] if verbose else ["--brief"]) + list(opts))
    from . import train

    train.main(argv)


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


# -- main ---------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit status (0 also when the teacher check warns)."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    import torch

    from ..data import dataset_description

    if args.threads:
        torch.set_num_threads(args.threads)
    plans = []
    for stage in STAGES:  # every config is checked before anything trains
        opts = stage_overrides(stage, args)
        plans.append((stage, opts, stage_cfg(stage, opts)))
    data_line = dataset_description(plans[0][2])
    print(f"demo: {data_line}", flush=True)
    print(f"demo: outputs in {os.path.abspath(args.out)}; torch threads {torch.get_num_threads()}", flush=True)
    teacher_retrained = False
    for i, (stage, opts, cfg) in enumerate(plans, 1):
        action, reason = plan_stage(stage, cfg, args.out, args.resume)
        if args.resume and stage.needs_teacher and teacher_retrained and action != "fresh":
            action, reason = "fresh", "the teacher was retrained"
        what = f"[{i}/{len(plans)}] {stage.name}: {stage.label}, {cfg.DISTILLER.STUDENT}" + (
            f" from teacher {cfg.DISTILLER.TEACHER}" if stage.needs_teacher and cfg.DISTILLER.TYPE != "NONE" else "")
        if action == "skip":
            print(f"demo: {what} -- {reason}; kept", flush=True)
            continue
        print(f"demo: {what} -- {'resuming' if action == 'resume' else 'training'}"
              f"{' (' + reason + ')' if reason else ''}", flush=True)
        t_stage = time.perf_counter()
        run_stage(stage, opts, action, args.out, args.verbose)
        print(f"demo: {stage.name} done in {time.perf_counter() - t_stage:.0f}s", flush=True)
        if stage is STAGES[0]:
            teacher_retrained = True
    runs = stage_runs(args.out)
    text, ok, check = results_text(args.out, runs, data_line, args.quick)
    plots = make_plots(args.out, runs)
    md_path = os.path.join(args.out, "demo_results.md")
    atomic_write_text(md_path, text + f"\n{plots}\n")
    print("\n" + text, flush=True)
    print(plots)
    print(f"wrote {md_path}")
    print(f"demo: total wall time {time.perf_counter() - t0:.0f}s", flush=True)
    if not ok:
        print("\n" + "!" * 78 + "\n" + check + "\n" + "!" * 78, flush=True)
    return 0


def cli(argv: Optional[Sequence[str]] = None):
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
