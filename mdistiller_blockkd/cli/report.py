"""Summarise training runs: a markdown results table and plots of their scores.

Reads run directories (``LOG.PREFIX/<PROJECT>/<NAME or TAG>/``), each holding
``config.yaml`` (the merged config the trainer dumped) and ``metrics.jsonl`` (one JSON
object per finished epoch: ``epoch``, ``test_acc``, ``acc_stone1`` ... ``acc_teacher``
for Block-KD, ...). Runs are grouped by

* pair: ``DISTILLER.TEACHER -> DISTILLER.STUDENT`` and ``DATASET.TYPE`` (for GLUE with its
  task, ``glue/cola``; shown in the column name only when the runs span several datasets);
  a ``NONE`` run, plain training of the student, appears in every pair column with its student;
* method: ``DISTILLER.TYPE`` plus its variant, named by the label keys (``--label-keys``):
  method options (``BLOCKKD.STONES``, ``LOGIT_LOSS``, ``CONNECTOR``, ``STONE_SCALE``,
  ``STONE_WEIGHTS``) that differ from the package default, e.g. ``BLOCKKD sample:1``, and
  hyper-parameters (``BLOCKKD.GAMMA``, ``T``, ``WARMUP``..., ``SOLVER.EPOCHS``) that differ
  from most runs of the report, e.g. ``BLOCKKD GAMMA=0.0``, or ``KD EPOCHS=24`` for a KD
  run trained twice as long as the others;
* the score: runs are ranked by top-1 (``test_acc``, ``val_acc``), but detection runs
  (``DATASET.TYPE coco``) by box AP (``test_AP``), with a table of ``AP, AP50, AP75, APs,
  APm, APl`` at their best-AP epoch, and GLUE runs by their task's metric, the one the
  trainer picks the best epoch by: CoLA by Matthews correlation (``test_mcc``, ``val_mcc``),
  MRPC and QQP by F1 (``test_f1``, ``val_f1``), the other tasks by top-1. The headings
  name the score (``Best CoLA Matthews corr. (%)``); where the runs have several, the
  tables say ``score`` and each column names its own
  (``glue/cola: bert->tiny (CoLA Matthews corr.)``);
* seed: ``EXPERIMENT.SEED`` (two runs with the same pair, method and seed: the one with
  more epochs is kept, with a warning).

Runs that scored a validation split (``DATASET.VAL_SPLIT``: ``val_acc``, or the
validation score, in their metrics) add, first, the last-epoch validation score (the
table to choose on), the test score at the epoch of best validation score, and
differences to each ``--baseline`` (repeatable) on the validation and the last-epoch
test score.

Output (markdown, to stdout and ``--out FILE.md``): a table of the best test score and
one of the last-epoch score, rows methods, columns pairs, cells ``mean ± std (n seeds)``
(sample standard deviation; a single seed shows no ±); the best score of each method
minus ``--baseline``'s (default KD) with Welch's standard error; Block-KD's last scored
stone and teacher top-1; the runs' own training ms/step; and a list of the runs. A run is ``complete`` when it is finished
(``mdistiller_blockkd.utils.runfolder.run_finished``: the record of epoch ``SOLVER.EPOCHS``
and the final checkpoints ``latest``, ``student_latest``, ``ckpt_epoch_<N>.pth``); one
still in progress or stopped counts with its epochs so far and is marked ``partial``. A run
folder that cannot be used -- a missing, unreadable or malformed ``config.yaml``
(``SOLVER.EPOCHS`` not a whole number...), a damaged ``metrics.jsonl`` (a bad line before
the last one, an epoch that is not a number), no evaluated epoch -- is skipped with a
warning on stderr and the other runs are reported; a last line cut short by a kill is
dropped with a warning. ``--out`` and ``--plots`` of the wrong kind (a folder for the file,
a file for the folder, a path under a file) stop the command with one ``error:`` line
before anything is read.

``--plots DIR`` (needs matplotlib; the Agg backend, no display) writes
``test_acc.png`` (test score per epoch, one panel per pair, one line per method, mean
over seeds with a ±std band) and, for every pair with Block-KD runs,
``stones_<teacher>_<student>.png`` (per Block-KD method: the student's ``test_acc``, every
``acc_stone<i>`` and ``acc_teacher`` per epoch, mean over seeds). Each epoch's mean is
over the seeds that reached it, so a curve can step where a partial run ends.
``--cost BENCH.json`` (a benchmark ``--json`` file) adds each method's step-cost ratio
and training cost in KD-epochs (ratio x epochs) to the cost table and, with
``--plots``, ``cost_acc.png``: last-epoch test score against training cost.

Examples::

    mdistiller-blockkd-report --root output/cifar100_blockkd --out results.md --plots plots/
    mdistiller-blockkd-report output/cifar100_baselines/kd,res56,res20 output/cifar100_blockkd/blockkd,res56,res20
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from . import doc_parser
from ..errors import UserError, run_cli
from ..results.labels import report_label_keys
from ..results.plots import import_pyplot, write_plots
from ..results.runs import (CONFIG, METRICS, find_run_dirs, group_runs, load_costs, load_runs, method_rows,
                            relabel_against_majority, warn)
from ..results.tables import build_markdown
from ..utils.fileio import atomic_write_text, check_output_path


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser("mdistiller-blockkd-report", __doc__, "Reads run")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (config.yaml + metrics.jsonl)")
    p.add_argument("--root", action="append", default=[], metavar="DIR",
                   help="find every run directory under DIR (repeatable)")
    p.add_argument("--out", metavar="FILE.md", help="also write the markdown report to this file")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR (needs matplotlib)")
    p.add_argument("--baseline", action="append", metavar="METHOD",
                   help="method the difference tables compare against (repeatable; default KD; e.g. 'NONE', "
                        "'BLOCKKD'): a row's whole label, or a distiller type that names one row alone "
                        "(KD for 'KD AMP=bf16')")
    keys = report_label_keys()
    p.add_argument("--label-keys", nargs="+", metavar="KEY", default=list(keys),
                   help="config keys whose values name a method variant: method options when they differ from "
                        "the package default, hyper-parameters when they differ from most runs of the report "
                        f"(default, from the registered distillers: {' '.join(keys)}); a key written +KEY is "
                        "added to the default ones, e.g. +DISTILLER.TEACHER_CKPT to keep the runs of two teachers "
                        "apart")
    p.add_argument("--twin", action="append", default=[], metavar="LABEL",
                   help="compare the runs whose label has the word LABEL (e.g. AMP=bf16) with the same method "
                        "without it, method by method (repeatable)")
    p.add_argument("--cost", metavar="BENCH.json",
                   help="a benchmark --json file: adds step-cost ratios and KD-epochs to the cost table and, with "
                        "--plots, cost_acc.png (score against training cost)")
    return p


def resolve_label_keys(given: Sequence[str]) -> List[str]:
    """``--label-keys``: the keys given, or, where every key is written ``+KEY``, the default keys and those."""
    plus = [k.startswith("+") for k in given]
    if not any(plus):
        return list(given)
    if not all(plus):
        raise UserError(f"--label-keys {' '.join(given)}: give either keys (they replace the default ones) or +KEY "
                        "entries (added to the default ones), not both")
    keys = list(report_label_keys())
    for k in given:
        if not k[1:]:
            raise UserError("--label-keys: '+' names no key; write +NODE.KEY, e.g. +DISTILLER.TEACHER_CKPT")
        if k[1:] not in keys:
            keys.append(k[1:])
    return keys


def resolve_baseline(base: str, groups, asked: bool = True) -> Optional[str]:
    """The method row that ``--baseline base`` names: the row of that exact label, else the one row of that
    distiller type (``KD`` names ``KD AMP=bf16`` in a report whose runs all trained in bf16). ``None`` (with a
    warning when the user asked for it) when no row, or several, match."""
    rows = method_rows(groups)
    if base in rows:
        return base
    same_type = [m for m in rows if m.split(" ", 1)[0] == base]
    if len(same_type) == 1:
        return same_type[0]
    if asked:
        if same_type:
            warn(f"--baseline {base}: several rows of that method ({', '.join(same_type)}); give one whole, "
                 f"e.g. --baseline '{same_type[0]}'; no difference table against {base}")
        else:
            warn(f"--baseline {base}: no run of that method (methods: {', '.join(rows)}); "
                 "no difference table against it")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the report; returns the exit status (bad input raises ``UserError``)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.runs and not args.root:
        raise UserError("give run directories (RUN_DIR ...) or --root DIR; see --help")
    check_output_path(args.out, "--out")
    check_output_path(args.plots, "--plots", folder=True)
    plt = import_pyplot() if args.plots is not None else None
    dirs = list(args.runs)
    for root in args.root:
        found = find_run_dirs(root)
        if not found:
            warn(f"--root {root}: no run directory (with {CONFIG} or {METRICS}) found")
        dirs += found
    args.label_keys = resolve_label_keys(args.label_keys)
    runs = load_runs(dirs, args.label_keys)
    if not runs:
        raise UserError("no usable run found (each needs config.yaml and a metrics.jsonl with at least one "
                        "evaluated epoch); see the warnings above")
    relabel_against_majority(runs, args.label_keys)
    costs = load_costs(args.cost) if args.cost else None
    groups = group_runs(runs)
    baselines = [resolve_baseline(b, groups, asked=args.baseline is not None) for b in args.baseline or ["KD"]]
    text = build_markdown(runs, groups, [b for b in baselines if b is not None], costs, args.twin)
    print(text, end="")
    if args.out is not None:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    if plt is not None:
        for p in write_plots(groups, args.plots, plt, costs):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def cli(argv=None) -> int:
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
