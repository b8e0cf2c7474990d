"""Summarise training runs: a markdown results table and accuracy plots.

Reads run directories (``LOG.PREFIX/<PROJECT>/<NAME or TAG>/``), each holding
``config.yaml`` (the merged config the trainer dumped) and ``metrics.jsonl`` (one JSON
object per finished epoch: ``epoch``, ``test_acc``, ``acc_stone1`` ... ``acc_teacher``
for Block-KD, ...). Runs are grouped by

* pair: ``DISTILLER.TEACHER -> DISTILLER.STUDENT`` and ``DATASET.TYPE`` (shown in the
  column name only when the runs span several datasets); a ``NONE`` run, plain training
  of the student, appears in every pair column with its student;
* method: ``DISTILLER.TYPE`` plus its variant, named by the label keys (``--label-keys``):
  method options (``BLOCKKD.STONES``, ``LOGIT_LOSS``, ``CONNECTOR``, ``STONE_SCALE``,
  ``STONE_WEIGHTS``) that differ from the package default, e.g. ``BLOCKKD sample:1``, and
  hyper-parameters (``BLOCKKD.GAMMA``, ``T``, ``WARMUP``..., ``SOLVER.EPOCHS``) that differ
  from most runs of the report, e.g. ``BLOCKKD GAMMA=0.0``, or ``KD EPOCHS=24`` for a KD
  run trained twice as long as the others;
* detection runs (``DATASET.TYPE coco``) are ranked by box AP (``test_AP``) instead of
  top-1, and get a table of ``AP, AP50, AP75, APs, APm, APl`` at their best-AP epoch;
* seed: ``EXPERIMENT.SEED`` (two runs with the same pair, method and seed: the one with
  more epochs is kept, with a warning).

Runs that scored a validation split (``DATASET.VAL_SPLIT``: ``val_acc`` in their
metrics) add, first, the last-epoch validation top-1 (the table to choose on), the test
top-1 at the epoch of best validation top-1, and differences to each ``--baseline``
(repeatable) on the validation and the last-epoch test top-1.

Output (markdown, to stdout and ``--out FILE.md``): a table of the best top-1 test
accuracy and one of the last-epoch top-1, rows methods, columns pairs, cells
``mean ± std (n seeds)`` (sample standard deviation; a single seed shows no ±); the
best top-1 of each method minus ``--baseline``'s (default KD) with Welch's standard
error; Block-KD's last scored stone and teacher accuracies; the runs' own training
ms/step; and a list of the runs. A run is ``complete`` when it is finished
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
``test_acc.png`` (test top-1 per epoch, one panel per pair, one line per method, mean
over seeds with a ±std band) and, for every pair with Block-KD runs,
``stones_<teacher>_<student>.png`` (per Block-KD method: the student's ``test_acc``, every
``acc_stone<i>`` and ``acc_teacher`` per epoch, mean over seeds). Each epoch's mean is
over the seeds that reached it, so a curve can step where a partial run ends.
``--cost BENCH.json`` (a benchmark ``--json`` file) adds each method's step-cost ratio
and training cost in KD-epochs (ratio x epochs) to the cost table and, with
``--plots``, ``cost_acc.png``: last-epoch test top-1 against training cost.

Examples::

    mdistiller-blockkd-report --root output/cifar100_blockkd --out results.md --plots plots/
    mdistiller-blockkd-report output/cifar100_baselines/kd,res56,res20 output/cifar100_blockkd/blockkd,res56,res20
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from ..errors import UserError, run_cli
from ..results.labels import (cfg_get, default_value, distiller_nodes, label_keys as registry_label_keys, method_label,
                              method_sort_key, report_label_keys, variant_label)
from ..results.stats import mean_std, read_metrics, welch
from ..utils.fileio import atomic_write_bytes_from, atomic_write_text, check_output_path
from ..utils.runfolder import missing_final_files

METRICS, CONFIG = "metrics.jsonl", "config.yaml"
#: Column order: mdistiller's CIFAR-100 pairs first, then the others in order of appearance.
UPSTREAM_PAIRS = [
    ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"),
    ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("ResNet50", "MobileNetV2"),
    ("vgg13", "MobileNetV2"), ("wrn_40_2", "ShuffleV1"),
    ("ResNet34", "ResNet18"), ("ResNet50", "MobileNetV1"),
]

Pair = Tuple[str, Optional[str], str]  # (dataset, teacher or None for plain training, student)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


@dataclass
class Run:
    """One run directory: its grouping keys and per-epoch records."""

    path: str
    dataset: str
    teacher: str
    student: str
    kind: str
    variant: str
    seed: int
    planned_epochs: int
    records: List[dict] = field(default_factory=list)
    cfg: dict = field(default_factory=dict, repr=False)
    #: variant by the registry's label keys (``results.labels.label_keys``) against the package defaults (what the benchmark names)
    cost_variant: str = ""
    #: final checkpoints the folder lacks (``latest``, ``student_latest``, ``ckpt_epoch_<N>.pth``)
    missing: List[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return method_label(self.kind, self.variant)

    @property
    def pair(self) -> Pair:
        return (self.dataset, None if self.kind == "NONE" else self.teacher, self.student)

    @property
    def score(self) -> str:
        """The metric the run is ranked by: ``test_acc``, or box AP ``test_AP`` for detection (``coco``)."""
        return "test_AP" if self.dataset == "coco" else "test_acc"

    @property
    def minutes(self) -> float:
        """Wall-clock minutes the run's epochs took (training and evaluation: ``epoch_time_s``)."""
        return sum(float(r["epoch_time_s"]) for r in self.records if _num(r.get("epoch_time_s")) is not None) / 60.0

    @property
    def scored(self) -> List[dict]:
        """Records that carry a numeric score (``test_acc``; ``test_AP`` for detection)."""
        return [r for r in self.records if _num(r.get(self.score)) is not None]

    @property
    def epochs(self) -> int:
        return len(self.scored)

    @property
    def last_epoch(self) -> float:
        s = self.scored
        return s[-1].get("epoch", len(s)) if s else 0

    @property
    def complete(self) -> bool:
        """Finished: the last planned epoch is recorded and the final checkpoints exist."""
        return self.last_epoch >= self.planned_epochs and not self.missing

    @property
    def best(self) -> float:
        return max(float(r[self.score]) for r in self.scored)

    @property
    def last(self) -> float:
        return float(self.scored[-1][self.score])

    @property
    def has_val(self) -> bool:
        return any(_num(r.get("val_acc")) is not None for r in self.scored)

    @property
    def val_last(self) -> Optional[float]:
        """Validation top-1 of the last epoch (``DATASET.VAL_SPLIT``), or None."""
        v = [r for r in self.scored if _num(r.get("val_acc")) is not None]
        return float(v[-1]["val_acc"]) if v else None

    @property
    def test_at_val_best(self) -> Optional[float]:
        """Test top-1 at the epoch of the best validation top-1 (ties: the later epoch), or None."""
        v = [r for r in self.scored if _num(r.get("val_acc")) is not None]
        if not v:
            return None
        best = max(range(len(v)), key=lambda i: (float(v[i]["val_acc"]), i))
        return float(v[best]["test_acc"])


def _num(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def pair_name(pair: Pair, with_dataset: bool = False) -> str:
    """``"resnet56->resnet20"`` (``"cifar100: resnet56->resnet20"`` with the dataset)."""
    ds, t, s = pair
    text = f"{t}->{s}" if t is not None else f"(plain)->{s}"
    return f"{ds}: {text}" if with_dataset else text


def several_datasets(groups) -> bool:
    """True when the runs come from more than one dataset (pair names then show it)."""
    return len({pair[0] for (pair, _m) in groups}) > 1


# -- loading ------------------------------------------------------------------------
def find_run_dirs(root: str) -> List[str]:
    """Every directory under ``root`` (itself included) holding ``metrics.jsonl`` or ``config.yaml``, sorted."""
    if not os.path.isdir(root):
        raise UserError(f"--root '{root}' is not a directory; give the folder holding run directories (LOG.PREFIX)")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if METRICS in files or CONFIG in files:
            found.append(folder)
    return sorted(found)


def load_run(path: str, label_keys: Sequence[str]) -> Optional[Run]:
    """The run in ``path``, or None (with a warning) when it cannot be used."""
    if not os.path.isdir(path):
        warn(f"{path}: not a directory; skipped")
        return None
    cfg_path, met_path = os.path.join(path, CONFIG), os.path.join(path, METRICS)
    if not os.path.isfile(cfg_path):
        warn(f"{path}: no {CONFIG} (needed to know pair, method and seed); skipped")
        return None
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8 text
        warn(f"{cfg_path}: cannot be read ({' '.join(str(e).split())[:160]}); skipped")
        return None
    problem = _config_problem(cfg)
    if problem:
        warn(f"{cfg_path}: {problem}; skipped")
        return None
    if not os.path.isfile(met_path):
        warn(f"{path}: no {METRICS} yet (no finished epoch); skipped")
        return None
    try:
        records, problems = read_metrics(met_path, skip_damaged=False)
    except (OSError, ValueError) as e:
        warn(f"{' '.join(str(e).split())[:200]}; skipped")
        return None
    bad = next((r for r in records if "epoch" in r and (type(r["epoch"]) is not int or r["epoch"] < 1)), None)
    if bad is not None:
        warn(f"{met_path}: a record has epoch {bad['epoch']!r}, not an epoch number; skipped")
        return None
    for p in problems:
        warn(p)
    kind = str(cfg_get(cfg, "DISTILLER.TYPE", "NONE")).upper()
    seed = cfg_get(cfg, "EXPERIMENT.SEED", 0)
    run = Run(
        path=path,
        dataset=str(cfg_get(cfg, "DATASET.TYPE", "cifar100")).lower(),
        teacher=str(cfg_get(cfg, "DISTILLER.TEACHER", "?")),
        student=str(cfg_get(cfg, "DISTILLER.STUDENT", "?")),
        kind=kind,
        variant=variant_label(cfg, label_keys),
        cost_variant=variant_label(cfg),
        cfg=cfg,
        seed=seed,
        planned_epochs=cfg_get(cfg, "SOLVER.EPOCHS", 240),
        records=records,
    )
    run.missing = missing_final_files(path, run.planned_epochs)
    if not run.scored:
        warn(f"{path}: {METRICS} has no epoch with a {run.score} yet; skipped")
        return None
    if run.last_epoch < run.planned_epochs:
        warn(f"{path}: in progress or stopped ({run.last_epoch:g} of {run.planned_epochs} epochs); included as partial")
    elif run.missing:
        warn(f"{path}: every epoch is recorded but its final checkpoint(s) {', '.join(run.missing)} are missing "
             "(stopped while saving, or copied without them); included as partial")
    return run


def _config_problem(cfg) -> Optional[str]:
    """What makes a run's loaded ``config.yaml`` unusable here, or None."""
    if not isinstance(cfg, dict):
        return "not a config mapping"
    for node in ("EXPERIMENT", "DATASET", "DISTILLER", "SOLVER", "BLOCKKD"):
        if node in cfg and not isinstance(cfg[node], dict):
            return f"{node} is {cfg[node]!r}, not a section of settings"
    for key, default, low in (("SOLVER.EPOCHS", 240, 1), ("EXPERIMENT.SEED", 0, None), ("BLOCKKD.DENSE_EPOCHS", 0, 0)):
        value = cfg_get(cfg, key, default)
        if type(value) is not int or (low is not None and value < low):
            return f"{key} is {value!r}, not a whole number" + (f" >= {low}" if low is not None else "")
    return None


def relabel_against_majority(runs: Sequence[Run], label_keys: Sequence[str]) -> None:
    """Name each run's variant by its label keys: method options against the package defaults,
    hyper-parameters (``results.labels.hyper_label_keys``) against the majority of the report's runs.

    The distillers' label keys (``STONES``, ``LOGIT_LOSS``...) always count
    against the package default, so a report of ``sample:1`` runs alone still says so.
    For the other keys the reference value is the most common value among the runs it
    concerns. For a distiller's own options (``BLOCKKD.*``, ``LSKD.*``) those are that
    distiller's runs on the same dataset, all pairs together, so every column of a study
    reads alike and one row means one setting. For recipe keys (``SOLVER.EPOCHS``) they are
    the runs of the same dataset and student, so pairs with other recipes do not label each
    other. A tie goes to the package default when it is among the tied values, else to the
    value read first. So settings every run of a study shares (a short warm-up, say) name
    nothing, and an ablation reads as what it changes (``BLOCKKD GAMMA=0.0``).
    """
    from collections import Counter

    refs: Dict[tuple, object] = {}
    method_keys = set(registry_label_keys())
    nodes = set(distiller_nodes())

    def reference_for(run: Run):
        def reference(key: str, kind: str):
            if key in method_keys:
                return default_value(key)
            node = key.split(".", 1)[0].upper()
            # a method's options: the whole dataset; a recipe key (SOLVER.EPOCHS): each student's pair alone
            scope = (run.dataset, kind, None) if node in nodes else (run.dataset, "*", run.student)
            if (key, scope) not in refs:
                peers = [r for r in runs if r.dataset == scope[0] and scope[1] in ("*", r.kind)
                         and scope[2] in (None, r.student)]
                values = [cfg_get(r.cfg, key, None) for r in peers]
                counts = Counter(repr(v) for v in values if v is not None)
                default = default_value(key)
                if not counts:
                    refs[(key, scope)] = default
                else:
                    top = max(counts.values())
                    tied = [c for c, n in counts.items() if n == top]
                    pick = repr(default) if repr(default) in tied else tied[0]
                    refs[(key, scope)] = next(v for v in values if repr(v) == pick)
            return refs[(key, scope)]
        return reference

    for r in runs:
        r.variant = variant_label(r.cfg, label_keys, reference=reference_for(r))


def group_runs(runs: Sequence[Run]) -> Dict[Tuple[Pair, str], Dict[int, Run]]:
    """``{(pair, method): {seed: run}}``; of two runs with the same keys the one with more epochs is kept."""
    groups: Dict[Tuple[Pair, str], Dict[int, Run]] = {}
    for run in runs:
        g = groups.setdefault((run.pair, run.method), {})
        other = g.get(run.seed)
        if other is not None:
            keep, drop = (run, other) if run.epochs >= other.epochs else (other, run)
            warn(f"{drop.path} and {keep.path} share pair {pair_name(run.pair, True)}, method {run.method} and seed "
                 f"{run.seed}; using {keep.path} (more epochs). Give them different EXPERIMENT.SEED, or name the "
                 f"differing key with --label-keys")
            g[run.seed] = keep
        else:
            g[run.seed] = run
    return groups


def column_pairs(groups) -> List[Pair]:
    """Table columns: teacher->student pairs, upstream order first; plain runs without a matching pair get their own."""
    pairs: List[Pair] = []
    for (pair, _method) in groups:
        if pair[1] is not None and pair not in pairs:
            pairs.append(pair)
    order = {p: i for i, p in enumerate(UPSTREAM_PAIRS)}
    first = {p: i for i, p in enumerate(pairs)}
    pairs.sort(key=lambda p: (p[0], order.get(p[1:], len(order)), first[p]))
    students = {(ds, s) for ds, _, s in pairs}
    for (pair, _method) in groups:
        if pair[1] is None and (pair[0], pair[2]) not in students and pair not in pairs:
            pairs.append(pair)
    return pairs


def method_rows(groups) -> List[str]:
    """Method labels in table order (the registry's ``table_order``, then name and variant)."""
    return sorted({m for (_p, m) in groups}, key=method_sort_key)


def cell_runs(groups, pair: Pair, method: str) -> List[Run]:
    """Runs of ``method`` for the column ``pair`` (plain training matches by student)."""
    if method.split(" ", 1)[0] == "NONE":
        g = groups.get(((pair[0], None, pair[2]), method), {})
    else:
        g = groups.get((pair, method), {})
    return [g[s] for s in sorted(g)]


def format_cell(values: Sequence[float], partial: int) -> str:
    """``"72.10 ± 0.35 (3 seeds)"``; one seed shows no ±; partial runs are counted."""
    if not values:
        return "–"
    m, s = mean_std(values)
    n = len(values)
    text = f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}"
    note = f"{n} seed{'s' if n > 1 else ''}"
    if partial:
        note += f", {partial} partial"
    return f"{text} ({note})"


def _values(runs: Sequence[Run], what: str) -> List[float]:
    return [v for v in (getattr(r, what) for r in runs) if v is not None]


def markdown_table(groups, what: str) -> str:
    """Markdown table of ``what`` (a :class:`Run` property: ``best``, ``last``, ``val_last``,
    ``test_at_val_best``) top-1, rows methods, columns pairs."""
    cols = column_pairs(groups)
    ds = several_datasets(groups)
    lines = ["| method | " + " | ".join(pair_name(p, ds) for p in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for method in method_rows(groups):
        cells = []
        for pair in cols:
            runs = cell_runs(groups, pair, method)
            cells.append(format_cell(_values(runs, what), sum(not r.complete for r in runs)))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_table(groups, baseline: str, what: str = "best") -> Optional[str]:
    """``what`` top-1 (a :class:`Run` property) of each method minus ``baseline``'s, per pair: ``d ± se (d/se)``.

    ``se`` is Welch's standard error of the difference of two means, sqrt(s_a^2/n_a + s_b^2/n_b);
    it needs two or more seeds on both sides. ``None`` when no column has the baseline.
    """
    cols = [p for p in column_pairs(groups) if cell_runs(groups, p, baseline)]
    if not cols:
        return None
    ds = several_datasets(groups)
    lines = ["| method | " + " | ".join(pair_name(p, ds) for p in cols) + " |", "|---|" + "---|" * len(cols)]
    for method in method_rows(groups):
        if method == baseline:
            continue
        cells = [diff_cell(_values(cell_runs(groups, pair, method), what),
                           _values(cell_runs(groups, pair, baseline), what)) for pair in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diff_cell(a: Sequence[float], b: Sequence[float]) -> str:
    """``mean(a) - mean(b) ± Welch's standard error (difference / se)``; ``–`` when a side is empty."""
    if not a or not b:
        return "–"
    d, se = welch(a, b)
    if len(a) < 2 or len(b) < 2:
        return f"{d:+.2f}"
    return f"{d:+.2f} ± {se:.2f} ({d / se:+.1f})" if se > 0 else f"{d:+.2f} ± 0.00"


def twin_table(groups, label: str, what: str) -> Optional[str]:
    """Per method, the runs labelled ``label`` (``AMP=bf16``) minus their twin without it, with Welch's standard error.

    A twin is the method whose label is the same without the word ``label`` (``KD AMP=bf16`` -> ``KD``).
    ``None`` when no method has a twin.
    """
    cols = column_pairs(groups)
    rows = []
    for method in method_rows(groups):
        words = method.split(" ")
        if label not in words:
            continue
        twin = " ".join(w for w in words if w != label)
        cells = [diff_cell(_values(cell_runs(groups, pair, method), what), _values(cell_runs(groups, pair, twin), what))
                 for pair in cols]
        if any(c != "–" for c in cells):
            rows.append(f"| {twin} | " + " | ".join(cells) + " |")
    if not rows:
        return None
    ds = several_datasets(groups)
    return "\n".join(["| method | " + " | ".join(pair_name(p, ds) for p in cols) + " |", "|---|" + "---|" * len(cols)]
                     + rows)


def mean_of_records(runs: Sequence[Run], key: str, last_only: bool = False) -> Optional[float]:
    """Mean of ``key`` over the runs' scored records (or each run's last record holding it)."""
    vals = []
    for r in runs:
        rec = [x for x in r.scored if _num(x.get(key)) is not None]
        vals += [float(x[key]) for x in (rec[-1:] if last_only else rec)]
    return sum(vals) / len(vals) if vals else None


def load_costs(path: str) -> Dict[Tuple[str, str, str, str], float]:
    """``{(teacher, student, distiller, variant): ratio_to_kd}`` from a benchmark ``--json`` file."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        rows = doc["results"]
        out = {(str(r["teacher"]), str(r["student"]), str(r["distiller"]).upper(), str(r["variant"] or "")):
               float(r["ratio_to_kd"]) for r in rows if r.get("ratio_to_kd") is not None}
    except FileNotFoundError:
        raise UserError(f"--cost '{path}' not found; write it with mdistiller-blockkd-benchmark ... --json {path}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--cost '{path}' is not a benchmark --json file ({type(e).__name__}: {e}); write it with "
                        "mdistiller-blockkd-benchmark ... --json FILE") from None
    if not out:
        raise UserError(f"--cost '{path}' holds no ratio to KD (run the benchmark with KD among the entries)")
    return out


def run_cost(run: Run, costs) -> Optional[float]:
    """Training cost of ``run`` in KD-step units per step (the benchmark's ratio), or None.

    A Block-KD run with ``DENSE_EPOCHS`` N costs ``(N * all + (E - N) * its schedule) / E``
    over its E epochs (the benchmark times the schedule after the dense epochs).
    """
    if not costs:
        return None
    kind = run.kind
    if kind == "NONE":  # a plain run appears in every pair with its student; any teacher's NONE entry will do
        vals = [v for (t, st, k, var), v in costs.items() if st == run.student and k == "NONE"]
        return vals[0] if vals else None
    cheap = costs.get((run.teacher, run.student, kind, run.cost_variant))
    dense = float(cfg_get(run.cfg, "BLOCKKD.DENSE_EPOCHS", 0) or 0) if kind == "BLOCKKD" else 0.0
    if cheap is None or dense <= 0 or run.planned_epochs <= 0:
        return cheap
    # DENSE_EPOCHS: every stone for the first epochs, then the cheap schedule: the cost per step, amortised
    import copy

    dense_cfg = copy.deepcopy(run.cfg)
    dense_cfg["BLOCKKD"]["STONES"] = "all"
    dense_cfg["BLOCKKD"]["STONE_SCALE"] = default_value("BLOCKKD.STONE_SCALE")
    full = costs.get((run.teacher, run.student, kind, variant_label(dense_cfg)))
    if full is None:
        return None
    n = min(dense, run.planned_epochs)
    return (n * full + (run.planned_epochs - n) * cheap) / run.planned_epochs


def cost_table(groups, costs=None) -> str:
    """Mean training ms/step (``ms_per_step`` of every epoch and seed), and its ratio to KD in the same column.

    With ``costs`` (a benchmark's ratios, :func:`load_costs`) each cell also gives the
    benchmark's step-cost ratio and the run's training cost in KD-epochs (ratio x epochs).
    """
    cols = column_pairs(groups)
    ds = several_datasets(groups)
    lines = ["| method | " + " | ".join(pair_name(p, ds) for p in cols) + " |", "|---|" + "---|" * len(cols)]
    for method in method_rows(groups):
        cells = []
        for pair in cols:
            runs = cell_runs(groups, pair, method)
            ms = mean_of_records(runs, "ms_per_step")
            kd = mean_of_records(cell_runs(groups, pair, "KD"), "ms_per_step")
            cell = "–" if ms is None else f"{ms:.0f}" + (f" ({ms / kd:.2f}× KD)" if kd else "")
            ratio = run_cost(runs[0], costs) if runs else None
            if ratio is not None:
                cell += f"; benchmark {ratio:.2f}× KD, {ratio * runs[0].planned_epochs:.1f} KD-epochs"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DETECTION_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detection_table(groups) -> Optional[str]:
    """Detection runs: the six COCO metrics at each run's best-AP epoch, mean over seeds; None without any."""
    rows = []
    ds = several_datasets(groups)
    for pair in column_pairs(groups):
        for method in method_rows(groups):
            runs = [r for r in cell_runs(groups, pair, method) if r.score == "test_AP"]
            if not runs:
                continue
            best = [max(r.scored, key=lambda x: float(x["test_AP"])) for r in runs]
            cells = [format_cell([float(b[f"test_{k}"]) for b in best if _num(b.get(f"test_{k}")) is not None],
                                 sum(not r.complete for r in runs)) for k in DETECTION_METRICS]
            rows.append(f"| {pair_name(pair, ds)} | {method} | " + " | ".join(cells) + " |")
    if not rows:
        return None
    head = "| pair | method | " + " | ".join(DETECTION_METRICS) + " |"
    return "\n".join([head, "|---|---|" + "---|" * len(DETECTION_METRICS)] + rows)


def stones_table(groups) -> Optional[str]:
    """Last scored epoch of each Block-KD method: student, every stone and the teacher, mean over seeds."""
    rows = []
    ds = several_datasets(groups)
    for pair in column_pairs(groups):
        for method in method_rows(groups):
            runs = cell_runs(groups, pair, method)
            keys = _stone_keys(runs)
            if not keys:
                continue
            parts = [f"student {mean_of_records(runs, 'test_acc', last_only=True):.2f}"]
            for k in keys + ["acc_teacher"]:
                v = mean_of_records(runs, k, last_only=True)
                if v is not None:
                    parts.append(f"{k[len('acc_'):]} {v:.2f}")
            rows.append(f"| {pair_name(pair, ds)} | {method} | {len(runs)} | " + ", ".join(parts) + " |")
    if not rows:
        return None
    return "\n".join(["| pair | method | seeds | last scored epoch: top-1 (%) |", "|---|---|---|---|"] + rows)


_SE_NOTE = ("Cells: difference of the means ± Welch's standard error (difference / standard error). With "
            "3 seeds a side, |difference / se| below about 2.8 is within seed noise (Welch t, about 4 "
            "degrees of freedom, 5% two-sided).")


def validation_sections(groups, baselines: Sequence[str]) -> List[str]:
    """Tables of runs that scored a validation split: validation and test top-1, and differences on both."""
    out = [
        "## Validation top-1, last epoch (%)", "",
        "The validation split is held out of the training images (`DATASET.VAL_SPLIT`): choose methods, "
        "variants and defaults on this table.", "",
        markdown_table(groups, "val_last"), "",
        "## Test top-1 at the epoch of best validation top-1 (%)", "",
        markdown_table(groups, "test_at_val_best"), "",
    ]
    for base in baselines:
        for what, title in (("val_last", "Validation top-1 (last epoch)"), ("last", "Test top-1 (last epoch)")):
            diff = difference_table(groups, base, what)
            if diff:
                out += [f"## {title} minus {base} (points)", "", _SE_NOTE, "", diff, ""]
    return out


def build_markdown(runs: Sequence[Run], groups, baseline="KD", costs=None, twins: Sequence[str] = ()) -> str:
    """The whole report as markdown; ``baseline`` is one method or a list of them; ``twins``: labels
    (``AMP=bf16``) whose runs are compared with their twins without the label, method by method."""
    baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    partial = sum(not r.complete for r in runs)
    out = [
        "# Results",
        "",
        f"{len(runs)} runs ({partial} partial). Cells: mean ± sample standard deviation over seeds "
        "(EXPERIMENT.SEED) of the top-1 test accuracy (%); `partial`: runs still in progress or stopped early, "
        "counted with their epochs so far.",
        "",
    ]
    if any(r.has_val for r in runs):
        out += validation_sections(groups, baselines)
    out += [
        "## Best top-1 (%)",
        "",
        "The best test top-1 over epochs" + (" (a choice made on the test set: for choosing, use the validation "
                                             "tables above)" if any(r.has_val for r in runs) else "") + ".",
        "",
        markdown_table(groups, "best"),
        "",
        "## Last-epoch top-1 (%)",
        "",
        markdown_table(groups, "last"),
        "",
    ]
    if not any(r.has_val for r in runs):
        for base in baselines:
            diff = difference_table(groups, base)
            if diff:
                out += [f"## Best top-1 minus {base} (points)", "", _SE_NOTE, "", diff, ""]
    for label in twins:
        for what, title in (("val_last", "Validation top-1 (last epoch)"), ("last", "Test top-1 (last epoch)")):
            table = twin_table(groups, label, what)
            if table and (what != "val_last" or any(r.has_val for r in runs)):
                out += [f"## {title}: {label} minus the same method without it (points)", "", _SE_NOTE, "", table, ""]
    det = detection_table(groups)
    if det:
        out += ["## Detection: COCO box mAP (%) at the best-AP epoch", "",
                "Detection runs (DATASET.TYPE coco) are ranked by box AP: in the tables above, and in "
                "test_acc.png, their cells are AP (%), not top-1.", "", det, ""]
    stones = stones_table(groups)
    if stones:
        out += ["## Block-KD stepping stones", "", stones, ""]
    out += [
        "## Training cost (ms/step)",
        "",
        "Mean of the runs' own `ms_per_step` over epochs and seeds; runs that shared the machine with "
        "others time slower, so compare within a column. For clean ratios use the benchmark command.",
        "",
        cost_table(groups, costs),
        "",
        "## Runs",
        "",
    ]
    runs = [g[seed] for _, g in sorted(groups.items(), key=lambda kv: (pair_name(kv[0][0], True), kv[0][1]))
            for seed in sorted(g)]
    out += [f"{len(runs)} runs took {sum(r.minutes for r in runs):.0f} minutes in all (the sum of their "
            "`epoch_time_s`: training and evaluation, one process each; runs that shared the machine count their "
            "own wall-clock time).", "",
            "| run | pair | method | seed | epochs | best | last | minutes | status |",
            "|---|---|---|---|---|---|---|---|---|"]
    ds = several_datasets(groups)
    for r in runs:
        ended = r.last_epoch >= r.planned_epochs  # not complete all the same: final checkpoints missing
        status = "complete" if r.complete else (f"partial ({r.last_epoch:g}/{r.planned_epochs}"
                                                 f"{', final checkpoints missing' if ended else ''})")
        out.append(f"| {r.path} | {pair_name(r.pair, ds)} | {r.method} | {r.seed} | {r.epochs} | {r.best:.2f} | "
                   f"{r.last:.2f} | {r.minutes:.1f} | {status} |")
    return "\n".join(out) + "\n"


# -- plots --------------------------------------------------------------------------
def import_pyplot():
    """matplotlib's pyplot on the Agg backend, or a UserError saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plots needs matplotlib, which is not installed: `pip install matplotlib`, "
                        "or leave out --plots to write the table only") from None
    return plt


def mean_curve(runs: Sequence[Run], key: str) -> Tuple[List[float], List[float], List[float]]:
    """``(epochs, mean, std)`` of ``key`` at every epoch some run has, over the runs that have it."""
    by_epoch: Dict[float, List[float]] = {}
    for r in runs:
        for i, rec in enumerate(r.records):
            v = _num(rec.get(key))
            if v is not None:
                by_epoch.setdefault(rec.get("epoch", i + 1), []).append(v)
    xs = sorted(by_epoch)
    stats = [mean_std(by_epoch[x]) for x in xs]
    return xs, [m for m, _ in stats], [s for _, s in stats]


#: At most this many series share a panel; more are split over further panels.
MAX_SERIES = 8
#: Panels per row of a plot grid.
PANELS_PER_ROW = 4
_MARKERS = "osD^vP*Xh<>p"


def _series_style(i: int, xs: Sequence[float] = ()) -> dict:
    """Colour and marker of the ``i``-th series of a panel: distinct within a panel (up to 10 series)."""
    style = {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)], "markersize": 3.5}
    if len(xs) > 12:
        style["markevery"] = max(1, len(xs) // 10)
    return style


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "pair"


def _legend_below(ax, n: int) -> None:
    """The panel's legend under its axes (never over the data), in two columns past four entries."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2 if n > 4 else 1, frameon=False)


def _style(ax, n: int, ylabel: str = "test top-1 (%)") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend_below(ax, n)


def _grid(plt, n: int, width: float = 4.3, height: float = 4.4):
    """A figure of ``n`` panels, :data:`PANELS_PER_ROW` to a row (each panel leaves room for its legend below)."""
    ncols = min(PANELS_PER_ROW, max(n, 1))
    nrows = math.ceil(max(n, 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(fig, path: str, plt) -> None:
    atomic_write_bytes_from(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def method_family(method: str) -> str:
    """``Block-KD`` for Block-KD's variants, ``baselines`` for every other method."""
    return "Block-KD" if method.split(" ", 1)[0] == "BLOCKKD" else "baselines"


def panels(groups, methods_of) -> List[Tuple[Pair, str, List[str]]]:
    """``(pair, title, methods)`` per panel: each pair's methods (``methods_of(pair)``) split by family,
    then into chunks of at most :data:`MAX_SERIES`."""
    out = []
    ds = several_datasets(groups)
    for pair in column_pairs(groups):
        methods = methods_of(pair)
        for family in ("baselines", "Block-KD"):
            fam = [m for m in methods if method_family(m) == family]
            size = math.ceil(len(fam) / math.ceil(len(fam) / MAX_SERIES)) if fam else 1  # balanced chunks
            chunks = [fam[i:i + size] for i in range(0, len(fam), size)]
            for k, chunk in enumerate(chunks):
                part = f" ({k + 1}/{len(chunks)})" if len(chunks) > 1 else ""
                out.append((pair, f"{pair_name(pair, ds)}: {family}{part}", chunk))
    return out


def plot_test_acc(groups, out_dir: str, plt) -> str:
    """``test_acc.png``: per pair, a panel of baselines and one of Block-KD variants (at most
    :data:`MAX_SERIES` lines each); one line (mean over seeds, ±std band) per method."""
    def methods_of(pair):
        return [m for m in method_rows(groups) if cell_runs(groups, pair, m)]

    todo = panels(groups, methods_of)
    fig, axes = _grid(plt, len(todo))
    for ax, (pair, title, methods) in zip(axes, todo):
        late = []  # values of the second half of each curve: the y range shows where the methods differ
        for i, method in enumerate(methods):
            runs = cell_runs(groups, pair, method)
            xs, mean, std = mean_curve(runs, runs[0].score)
            late += [m for x, m in zip(xs, mean) if x >= xs[-1] / 2]
            style = _series_style(i, xs)
            ax.plot(xs, mean, label=f"{method} ({len(runs)})", linewidth=1.3, **style)
            if len(runs) > 1:
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=style["color"], alpha=0.15, linewidth=0)
        if late:
            lo, hi = min(late), max(late)
            pad = max(0.5, 0.15 * (hi - lo))
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(title + ("" if not late else " (second half's range)"), fontsize=9)
        _style(ax, len(methods))
    path = os.path.join(out_dir, "test_acc.png")
    _save(fig, path, plt)
    return path


def pareto_front(points: Sequence[Tuple[float, float, str]]) -> List[Tuple[float, float, str]]:
    """The points ``(cost, accuracy, name)`` that no cheaper-or-equal point beats, by cost."""
    front, best = [], -math.inf
    for c, a, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((c, a, name))
            best = a
    return front


def plot_cost(groups, costs, out_dir: str, plt) -> Optional[str]:
    """``cost_acc.png``: per pair, last-epoch test top-1 (mean ± std over seeds) against training cost.

    Cost = the benchmark's step cost in KD steps x epochs (KD-epochs), so KD trained twice
    as long and Block-KD at twice KD's step cost stand at the same x. A pair's baselines and
    its Block-KD variants get a panel each; both panels draw the pair's Pareto front over all
    of its methods (the best accuracy at each cost), with the methods on it named. None
    without costs.
    """
    if not costs:
        return None
    points: Dict[Pair, Dict[str, Tuple[float, float, float, int]]] = {}
    for pair in column_pairs(groups):
        for method in method_rows(groups):
            runs = cell_runs(groups, pair, method)
            ratio = run_cost(runs[0], costs) if runs else None
            if ratio is None:
                continue
            m, sd = mean_std([r.last for r in runs])
            points.setdefault(pair, {})[method] = (ratio * runs[0].planned_epochs, m, sd, len(runs))
    if not points:
        warn("--cost: no run matched a benchmark entry (teacher, student, distiller, variant); no cost plot")
        return None
    todo = panels(groups, lambda pair: list(points.get(pair, {})))
    fig, axes = _grid(plt, len(todo), height=4.8)
    for ax, (pair, title, methods) in zip(axes, todo):
        pts = points[pair]
        front = pareto_front([(x, m, name) for name, (x, m, _sd, _n) in pts.items()])
        xs = [v[0] for v in pts.values()]
        pad = 0.05 * (max(xs) - min(xs) or 1.0)
        ax.set_xlim(min(xs) - pad, max(xs) + pad)  # the same cost axis in every panel of the pair
        ax.plot([p[0] for p in front] + [max(xs) + pad], [p[1] for p in front] + [front[-1][1]], drawstyle="steps-post",
                color="0.55", linestyle="--", linewidth=1.0, label="Pareto front (all methods)", zorder=1)
        for i, method in enumerate(methods):
            x, m, sd, n = pts[method]
            style = _series_style(i)
            ax.errorbar([x], [m], yerr=[sd] if n > 1 else None, fmt=style["marker"], color=style["color"], capsize=3,
                        markersize=5, label=f"{method} ({n})", zorder=3)
        for x, m, name in front:  # name the front's methods (in every panel, so each panel reads alone)
            ax.annotate(name, (x, m), textcoords="offset points", xytext=(4, 4), fontsize=6, color="0.3")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training cost (KD-epochs)")
        ax.set_ylabel("test top-1, last epoch (%)")
        ax.grid(alpha=0.3)
        _legend_below(ax, len(methods) + 1)
    path = os.path.join(out_dir, "cost_acc.png")
    _save(fig, path, plt)
    return path


def _stone_keys(runs: Sequence[Run]) -> List[str]:
    keys = set()
    for r in runs:
        for rec in r.records:
            keys.update(k for k in rec if re.fullmatch(r"acc_stone\d+", k))
    return sorted(keys, key=lambda k: int(k[len("acc_stone"):]))


def plot_stones(groups, out_dir: str, plt) -> List[str]:
    """``stones_<pair>.png`` per pair with Block-KD runs: student, stones and teacher accuracy per epoch,
    one panel per Block-KD variant, :data:`PANELS_PER_ROW` panels to a row."""
    paths = []
    for pair in column_pairs(groups):
        methods = [m for m in method_rows(groups) if m.split(" ", 1)[0] == "BLOCKKD" and cell_runs(groups, pair, m)
                   and _stone_keys(cell_runs(groups, pair, m))]  # detection Block-KD scores no stones
        if not methods:
            continue
        fig, axes = _grid(plt, len(methods), height=4.0)
        for ax, method in zip(axes, methods):
            runs = cell_runs(groups, pair, method)
            series = ([("test_acc", "student")] + [(k, k[len("acc_"):]) for k in _stone_keys(runs)]
                      + [("acc_teacher", "teacher")])
            drawn = 0
            for key, label in series:
                xs, mean, _ = mean_curve(runs, key)
                if xs:
                    ax.plot(xs, mean, label=label, linewidth=1.3, **_series_style(drawn, xs))
                    drawn += 1
            ax.set_title(f"{pair_name(pair, several_datasets(groups))}  {method} "
                         f"({len(runs)} seed{'s' if len(runs) > 1 else ''})", fontsize=9)
            _style(ax, drawn)
        stem = f"stones_{_safe(pair[1] or 'plain')}_{_safe(pair[2])}"
        if several_datasets(groups):
            stem += f"_{_safe(pair[0])}"
        path = os.path.join(out_dir, f"{stem}.png")
        _save(fig, path, plt)
        paths.append(path)
    return paths


# -- main ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdistiller-blockkd-report",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Reads run"):],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (config.yaml + metrics.jsonl)")
    p.add_argument("--root", action="append", default=[], metavar="DIR",
                   help="find every run directory under DIR (repeatable)")
    p.add_argument("--out", metavar="FILE.md", help="also write the markdown report to this file")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR (needs matplotlib)")
    p.add_argument("--baseline", action="append", metavar="METHOD",
                   help="method the difference tables compare against (repeatable; default KD; e.g. 'NONE', "
                        "'BLOCKKD')")
    keys = report_label_keys()
    p.add_argument("--label-keys", nargs="+", metavar="KEY", default=list(keys),
                   help="config keys whose values name a method variant: method options when they differ from "
                        "the package default, hyper-parameters when they differ from most runs of the report "
                        f"(default, from the registered distillers: {' '.join(keys)})")
    p.add_argument("--twin", action="append", default=[], metavar="LABEL",
                   help="compare the runs whose label has the word LABEL (e.g. AMP=bf16) with the same method "
                        "without it, method by method (repeatable)")
    p.add_argument("--cost", metavar="BENCH.json",
                   help="a benchmark --json file: adds step-cost ratios and KD-epochs to the cost table and, with "
                        "--plots, cost_acc.png (accuracy against training cost)")
    return p


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
    seen, runs = set(), []
    for d in dirs:
        key = os.path.realpath(d)
        if key in seen:
            continue
        seen.add(key)
        run = load_run(d, args.label_keys)
        if run is not None:
            runs.append(run)
    if not runs:
        raise UserError("no usable run found (each needs config.yaml and a metrics.jsonl with at least one "
                        "evaluated epoch); see the warnings above")
    relabel_against_majority(runs, args.label_keys)
    costs = load_costs(args.cost) if args.cost else None
    groups = group_runs(runs)
    methods = {m for (_p, m) in groups}
    for base in args.baseline or []:
        if base not in methods:
            warn(f"--baseline {base}: no run of that method (methods: {', '.join(method_rows(groups))}); "
                 "no difference table against it")
    text = build_markdown(runs, groups, args.baseline or ["KD"], costs, args.twin)
    print(text, end="")
    if args.out is not None:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    if plt is not None:
        os.makedirs(args.plots, exist_ok=True)
        paths = [plot_test_acc(groups, args.plots, plt)] + plot_stones(groups, args.plots, plt)
        cost_png = plot_cost(groups, costs, args.plots, plt)
        if cost_png:
            paths.append(cost_png)
        for p in paths:
            print(f"wrote {p}", file=sys.stderr)
    return 0



def cli(argv=None) -> int:
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
