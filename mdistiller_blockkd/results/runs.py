"""The run model: run folders read into :class:`Run`, grouped by pair, method and seed.

A run folder (``LOG.PREFIX/<PROJECT>/<NAME or TAG>/``) holds ``config.yaml`` (the merged
config the trainer dumped) and ``metrics.jsonl`` (one JSON object per finished epoch).
:func:`load_run` reads one (or skips it with a warning on stderr), :func:`load_runs` a list
of them; :func:`relabel_against_majority` names each run's variant against the other runs;
:func:`group_runs` gives ``{(pair, method): {seed: run}}``, read by the report's tables and
plots (:mod:`.tables`, :mod:`.plots`) and the demo through :func:`column_pairs`,
:func:`method_rows` and :func:`cell_runs`. :func:`load_costs` and :func:`run_cost` join runs
with a benchmark's step-cost ratios.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from ..data.text import GLUE_TASKS, GlueTask
from ..errors import UserError
from ..utils.precision import precision_name
from ..utils.runfolder import missing_final_files
from .labels import (DEFAULT_REFERENCED_KEYS, cfg_get, default_value, distiller_nodes, label_keys as registry_label_keys, method_label,
                     method_sort_key, variant_label)
from .stats import mean_std, read_metrics

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
#: A GLUE run's dataset: ``glue/<DATASET.GLUE.TASK>`` (each task its own columns: they differ in metric).
GLUE = "glue/"
#: What headings call a score (``test_<name>``).
METRIC_NAMES = {"acc": "top-1", "AP": "box AP", "mcc": "Matthews corr.", "f1": "F1"}


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
    def glue(self) -> Optional[GlueTask]:
        """The GLUE task of a ``glue/<task>`` run, else None."""
        return GLUE_TASKS.get(self.dataset[len(GLUE):]) if self.dataset.startswith(GLUE) else None

    @property
    def score(self) -> str:
        """The metric the run is ranked by: ``test_acc``; box AP ``test_AP`` for detection (``coco``); a GLUE
        task's own (the first of its ``metrics``: ``test_mcc`` for CoLA, ``test_f1`` for MRPC and QQP)."""
        if self.dataset == "coco":
            return "test_AP"
        return f"test_{self.glue.metrics[0]}" if self.glue else "test_acc"

    @property
    def val_score(self) -> str:
        """The validation counterpart of :attr:`score` (``val_acc``, ``val_mcc``...)."""
        return "val_" + self.score[len("test_"):]

    @property
    def metric(self) -> str:
        """What headings call :attr:`score`: ``top-1``, ``box AP``, ``CoLA Matthews corr.``, ``MRPC F1``."""
        name = METRIC_NAMES[self.score[len("test_"):]]
        return f"{self.glue.folder} {name}" if self.glue and self.score != "test_acc" else name

    @property
    def seconds(self) -> float:
        """Wall-clock seconds the run's epochs took (training and evaluation: ``epoch_time_s``)."""
        return sum(float(r["epoch_time_s"]) for r in self.records if number(r.get("epoch_time_s")) is not None)

    @property
    def minutes(self) -> float:
        return self.seconds / 60.0

    @property
    def ms_per_step(self) -> float:
        """Median over the scored epochs of the training ms per step (``ms_per_step``); NaN without any."""
        steps = [float(r["ms_per_step"]) for r in self.scored if number(r.get("ms_per_step")) is not None]
        return statistics.median(steps) if steps else float("nan")

    @property
    def scored(self) -> List[dict]:
        """Records that carry a numeric :attr:`score`."""
        return [r for r in self.records if number(r.get(self.score)) is not None]

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
        return any(number(r.get(self.val_score)) is not None for r in self.scored)

    @property
    def val_last(self) -> Optional[float]:
        """Validation :attr:`val_score` of the last epoch (``DATASET.VAL_SPLIT``), or None."""
        v = [r for r in self.scored if number(r.get(self.val_score)) is not None]
        return float(v[-1][self.val_score]) if v else None

    @property
    def test_at_val_best(self) -> Optional[float]:
        """Test :attr:`score` at the epoch of the best :attr:`val_score` (ties: the later epoch), or None."""
        v = [r for r in self.scored if number(r.get(self.val_score)) is not None]
        if not v:
            return None
        best = max(range(len(v)), key=lambda i: (float(v[i][self.val_score]), i))
        return float(v[best][self.score])


def number(v) -> Optional[float]:
    """``v`` as a float when it is a finite number (not a bool), else None: how a record's value is read."""
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


def dataset_metrics(groups) -> Dict[str, str]:
    """``{dataset: metric}`` of the runs of ``groups`` (:attr:`Run.metric`: one per dataset)."""
    return {pair[0]: r.metric for (pair, _m), g in groups.items() for r in g.values()}


def report_metric(groups) -> str:
    """The metric every run of ``groups`` is ranked by (``top-1``, ``CoLA Matthews corr.``...), or ``score``
    when they are ranked by several (each column's heading then names its own: :func:`column_name`)."""
    metrics = set(dataset_metrics(groups).values())
    return metrics.pop() if len(metrics) == 1 else "score"


def column_name(groups, pair: Pair) -> str:
    """Heading of the column ``pair``: :func:`pair_name` (with the dataset when the runs span several), and
    the column's metric when the runs are ranked by several (``glue/cola: bert->tiny (CoLA Matthews corr.)``)."""
    name = pair_name(pair, several_datasets(groups))
    return name if report_metric(groups) != "score" else f"{name} ({dataset_metrics(groups)[pair[0]]})"


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
        dataset=dataset_name(cfg),
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


def dataset_name(cfg) -> str:
    """``DATASET.TYPE`` of a run's config, lower-case; ``glue/<DATASET.GLUE.TASK>`` for GLUE (``glue/cola``)."""
    dataset = str(cfg_get(cfg, "DATASET.TYPE", "cifar100")).strip().lower()
    if dataset != "glue":
        return dataset
    return GLUE + str(cfg_get(cfg, "DATASET.GLUE.TASK", default_value("DATASET.GLUE.TASK"))).strip().lower()


def _config_problem(cfg) -> Optional[str]:
    """What makes a run's loaded ``config.yaml`` unusable here, or None."""
    if not isinstance(cfg, dict):
        return "not a config mapping"
    for node in ("EXPERIMENT", "DATASET", "DISTILLER", "SOLVER", "BLOCKKD"):
        if node in cfg and not isinstance(cfg[node], dict):
            return f"{node} is {cfg[node]!r}, not a section of settings"
    dataset = dataset_name(cfg)
    if dataset.startswith(GLUE) and dataset[len(GLUE):] not in GLUE_TASKS:
        return f"DATASET.GLUE.TASK is {dataset[len(GLUE):]!r}, not one of {', '.join(GLUE_TASKS)}"
    for key, default, low in (("SOLVER.EPOCHS", 240, 1), ("EXPERIMENT.SEED", 0, None), ("BLOCKKD.DENSE_EPOCHS", 0, 0)):
        value = cfg_get(cfg, key, default)
        if type(value) is not int or (low is not None and value < low):
            return f"{key} is {value!r}, not a whole number" + (f" >= {low}" if low is not None else "")
    return None


def load_runs(dirs: Sequence[str], label_keys: Sequence[str]) -> List[Run]:
    """The usable runs of ``dirs`` (each folder once, however it is named), in order; see :func:`load_run`."""
    seen, runs = set(), []
    for d in dirs:
        key = os.path.realpath(d)
        if key in seen:
            continue
        seen.add(key)
        run = load_run(d, label_keys)
        if run is not None:
            runs.append(run)
    return runs


def relabel_against_majority(runs: Sequence[Run], label_keys: Sequence[str]) -> None:
    """Name each run's variant by its label keys: method options against the package defaults,
    hyper-parameters (``results.labels.hyper_label_keys``) against the majority of the report's runs.

    The distillers' label keys (``STONES``, ``LOGIT_LOSS``...) always count
    against the package default, so a report of ``sample:1`` runs alone still says so; so
    does the precision (``labels.DEFAULT_REFERENCED_KEYS``: a bf16 run reads ``AMP=bf16``
    even in a report of mostly bf16 runs). For the other keys the reference value is the most common value among the runs it
    concerns. For a distiller's own options (``BLOCKKD.*``, ``LSKD.*``) those are that
    distiller's runs on the same dataset, all pairs together, so every column of a study
    reads alike and one row means one setting. For recipe keys (``SOLVER.EPOCHS``) they are
    the runs of the same dataset and student, so pairs with other recipes do not label each
    other. A tie goes to the package default when it is among the tied values, else to the
    value read first. So settings every run of a study shares (a short warm-up, say) name
    nothing, and an ablation reads as what it changes (``BLOCKKD GAMMA=0.0``).
    """
    refs: Dict[tuple, object] = {}
    method_keys = set(registry_label_keys())
    nodes = set(distiller_nodes())

    def reference_for(run: Run):
        def reference(key: str, kind: str):
            if key in method_keys or key in DEFAULT_REFERENCED_KEYS:
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




def mean_of_records(runs: Sequence[Run], key: str, last_only: bool = False) -> Optional[float]:
    """Mean of ``key`` over the runs' scored records (or each run's last record holding it)."""
    vals = []
    for r in runs:
        rec = [x for x in r.scored if number(x.get(key)) is not None]
        vals += [float(x[key]) for x in (rec[-1:] if last_only else rec)]
    return sum(vals) / len(vals) if vals else None


#: One benchmark row as the report matches it: ``ratio_to_kd`` and what the step was timed with.
CostRow = Dict[str, object]


def load_costs(path: str) -> Dict[Tuple[str, str, str, str], List[CostRow]]:
    """``{(teacher, student, distiller, variant): [row, ...]}`` from a benchmark ``--json`` file; each row holds
    ``ratio``, ``precision``, ``batch_size`` and ``channels_last`` (``None`` where the file does not say)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        rows = doc["results"]
        out: Dict[Tuple[str, str, str, str], List[CostRow]] = {}
        for r in rows:
            if r.get("ratio_to_kd") is None:
                continue
            key = (str(r["teacher"]), str(r["student"]), str(r["distiller"]).upper(), str(r["variant"] or ""))
            out.setdefault(key, []).append({"ratio": float(r["ratio_to_kd"]), "precision": r.get("precision"),
                                            "batch_size": r.get("batch_size"), "channels_last": r.get("channels_last")})
    except FileNotFoundError:
        raise UserError(f"--cost '{path}' not found; write it with mdistiller-blockkd-benchmark ... --json {path}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--cost '{path}' is not a benchmark --json file ({type(e).__name__}: {e}); write it with "
                        "mdistiller-blockkd-benchmark ... --json FILE") from None
    if not out:
        raise UserError(f"--cost '{path}' holds no ratio to KD (run the benchmark with KD among the entries)")
    return out


def run_precision(run: Run) -> str:
    """The precision ``run`` trained in, as the benchmark names it: ``fp32`` (``SOLVER.AMP off``), ``bf16``, ``fp16``
    (the trainer records what ``auto`` chose)."""
    amp = cfg_get(run.cfg, "SOLVER.AMP", "off")
    return precision_name("off" if amp in (None, False) else str(amp).lower())  # YAML reads a bare off as False


def _pick_cost(rows: Optional[List[CostRow]], run: Run, key) -> Optional[float]:
    """The ratio of the row timed as ``run`` trains: its precision (a row that names none matches any), then, where
    the file has rows at several batch sizes or layouts, the one at the run's batch and layout; else the first
    such row, with a warning that says so."""
    if not rows:
        return None
    prec = run_precision(run)
    rows = [r for r in rows if r["precision"] in (None, prec)]
    if not rows:
        return None
    if len(rows) == 1:
        return rows[0]["ratio"]
    batch = cfg_get(run.cfg, "SOLVER.BATCH_SIZE", None)
    layout = bool(cfg_get(run.cfg, "SOLVER.CHANNELS_LAST", False))
    exact = [r for r in rows if r["batch_size"] in (None, batch) and r["channels_last"] in (None, layout)]
    if exact:
        return exact[0]["ratio"]
    first = rows[0]
    warn(f"--cost: no {' '.join(key[2:]).strip()} {prec} row at batch {batch}{' channels-last' if layout else ''} "
         f"for {key[0]}->{key[1]}; took the row at batch {first['batch_size']}"
         f"{' channels-last' if first['channels_last'] else ''}")
    return first["ratio"]


def run_cost(run: Run, costs) -> Optional[float]:
    """Training cost of ``run`` in KD-step units per step (the benchmark's ratio at the run's precision), or None.

    A Block-KD run with ``DENSE_EPOCHS`` N costs ``(N * all + (E - N) * its schedule) / E``
    over its E epochs (the benchmark times the schedule after the dense epochs).
    """
    if not costs:
        return None
    kind = run.kind
    if kind == "NONE":  # a plain run appears in every pair with its student; any teacher's NONE entry will do
        for key, rows in costs.items():
            if key[1] == run.student and key[2] == "NONE":
                ratio = _pick_cost(rows, run, key)
                if ratio is not None:
                    return ratio
        return None
    key = (run.teacher, run.student, kind, run.cost_variant)
    cheap = _pick_cost(costs.get(key), run, key)
    dense = float(cfg_get(run.cfg, "BLOCKKD.DENSE_EPOCHS", 0) or 0) if kind == "BLOCKKD" else 0.0
    if cheap is None or dense <= 0 or run.planned_epochs <= 0:
        return cheap
    # DENSE_EPOCHS: every stone for the first epochs, then the cheap schedule: the cost per step, amortised
    dense_cfg = copy.deepcopy(run.cfg)
    dense_cfg["BLOCKKD"]["STONES"] = "all"
    dense_cfg["BLOCKKD"]["STONE_SCALE"] = default_value("BLOCKKD.STONE_SCALE")
    full_key = (run.teacher, run.student, kind, variant_label(dense_cfg))
    full = _pick_cost(costs.get(full_key), run, full_key)
    if full is None:
        return None
    n = min(dense, run.planned_epochs)
    return (n * full + (run.planned_epochs - n) * cheap) / run.planned_epochs


def mean_curve(runs: Sequence[Run], key: str) -> Tuple[List[float], List[float], List[float]]:
    """``(epochs, mean, std)`` of ``key`` at every epoch some run has, over the runs that have it."""
    by_epoch: Dict[float, List[float]] = {}
    for r in runs:
        for i, rec in enumerate(r.records):
            v = number(rec.get(key))
            if v is not None:
                by_epoch.setdefault(rec.get("epoch", i + 1), []).append(v)
    xs = sorted(by_epoch)
    stats = [mean_std(by_epoch[x]) for x in xs]
    return xs, [m for m, _ in stats], [s for _, s in stats]


def stone_keys(runs: Sequence[Run]) -> List[str]:
    """The ``acc_stone<i>`` keys the runs' records hold, by stone number."""
    keys = set()
    for r in runs:
        for rec in r.records:
            keys.update(k for k in rec if re.fullmatch(r"acc_stone\d+", k))
    return sorted(keys, key=lambda k: int(k[len("acc_stone"):]))
