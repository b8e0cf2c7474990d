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

The library side (stages, their state, results) is :mod:`mdistiller_blockkd.results.demo`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

# OpenMP threads that wait passively: on a CPU shared with other busy processes, spinning
# threads make torch's CPU kernels up to ~10x slower (measured on 2 shared cores); when the
# CPU is free the cost is small. Set before torch is imported; a user's own value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ..errors import ConfigError, run_cli  # noqa: E402
from ..results.demo import (STAGES, make_plots, plan_stage, results_text, run_stage, stage_cfg,  # noqa: E402
                            stage_overrides, stage_runs)
from ..utils.fileio import atomic_write_text, check_output_path  # noqa: E402

DEFAULT_OUT = os.path.join("output", "demo")
QUICK_OUT = os.path.join("output", "demo_quick")


# -- command line -------------------------------------------------------------------
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


# -- main ---------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit status (0 also when the teacher check warns)."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    import torch

    from ..data import dataset_description
    from . import train

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
        run_stage(stage, opts, action, args.out, args.verbose, train.main)
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
