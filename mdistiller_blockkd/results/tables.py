"""The report's markdown: tables of runs grouped by :func:`.runs.group_runs`, and the whole report.

Cells are ``mean ± std (n seeds)`` over seeds of the runs' score (:attr:`.runs.Run.score`: top-1,
box AP for detection, a GLUE task's own metric; the headings name it: :func:`.runs.report_metric`,
:func:`.runs.column_name`); differences carry Welch's standard error (:func:`.stats.welch`).
:func:`build_markdown` writes the report command's document; :func:`summary_table` the demo's one
line per run.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, List, Optional, Sequence, Tuple

from .runs import (Run, cell_runs, column_name, column_pairs, mean_of_records, method_rows, number, pair_name,
                   report_metric, run_cost, several_datasets, stone_keys)
from .stats import mean_std, welch

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


def _header(groups, cols: Sequence) -> List[str]:
    """The two header lines of a table with a row per method and a column per pair of ``cols``."""
    return ["| method | " + " | ".join(column_name(groups, p) for p in cols) + " |", "|---|" + "---|" * len(cols)]


def _method_table(groups, cols: Sequence, cell: Callable[[tuple, str], str], skip: str = "") -> str:
    """A table with a row per method (but ``skip``) and a column per pair of ``cols``: ``cell(pair, method)``."""
    lines = _header(groups, cols)
    for method in method_rows(groups):
        if method != skip:
            lines.append(f"| {method} | " + " | ".join(cell(pair, method) for pair in cols) + " |")
    return "\n".join(lines)


def _values(runs: Sequence[Run], what: str) -> List[float]:
    return [v for v in (getattr(r, what) for r in runs) if v is not None]


def markdown_table(groups, what: str) -> str:
    """Markdown table of ``what`` (a :class:`Run` property of its score: ``best``, ``last``, ``val_last``,
    ``test_at_val_best``), rows methods, columns pairs."""
    def cell(pair, method):
        runs = cell_runs(groups, pair, method)
        return format_cell(_values(runs, what), sum(not r.complete for r in runs))

    return _method_table(groups, column_pairs(groups), cell)


def difference_table(groups, baseline: str, what: str = "best") -> Optional[str]:
    """``what`` (a :class:`Run` property of its score) of each method minus ``baseline``'s, per pair: ``d ± se (d/se)``.

    ``se`` is Welch's standard error of the difference of two means, sqrt(s_a^2/n_a + s_b^2/n_b);
    it needs two or more seeds on both sides. ``None`` when no column has the baseline.
    """
    cols = [p for p in column_pairs(groups) if cell_runs(groups, p, baseline)]
    if not cols:
        return None
    return _method_table(groups, cols, lambda pair, method: _diff(groups, pair, method, baseline, what), skip=baseline)


def _diff(groups, pair, method: str, other: str, what: str) -> str:
    """:func:`diff_cell` of ``method``'s ``what`` values minus ``other``'s in the column ``pair``."""
    return diff_cell(_values(cell_runs(groups, pair, method), what), _values(cell_runs(groups, pair, other), what))


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
        cells = [_diff(groups, pair, method, twin, what) for pair in cols]
        if any(c != "–" for c in cells):
            rows.append(f"| {twin} | " + " | ".join(cells) + " |")
    if not rows:
        return None
    return "\n".join(_header(groups, cols) + rows)


def median_ms_per_step(runs: Sequence[Run]) -> Optional[float]:
    """Median over ``runs`` of :attr:`Run.ms_per_step` (runs without timings left out), or None."""
    ms = [r.ms_per_step for r in runs if not math.isnan(r.ms_per_step)]
    return statistics.median(ms) if ms else None


def cost_table(groups, costs=None) -> str:
    """Training ms/step and steps/s: the median over seeds of each run's median ``ms_per_step`` over its epochs
    (robust to epochs that shared the machine or were paused), and its ratio to KD in the same column.

    With ``costs`` (a benchmark's ratios, :func:`load_costs`) each cell also gives the
    benchmark's step-cost ratio and the run's training cost in KD-epochs (ratio x epochs).
    """
    def cell(pair, method):
        runs = cell_runs(groups, pair, method)
        ms = median_ms_per_step(runs)
        kd = median_ms_per_step(cell_runs(groups, pair, "KD"))
        text = "–" if ms is None else f"{ms:.0f} ({1000 / ms:.2f} steps/s" + (f", {ms / kd:.2f}× KD)" if kd else ")")
        ratio = run_cost(runs[0], costs) if runs else None
        if ratio is not None:
            text += f"; benchmark {ratio:.2f}× KD, {ratio * runs[0].planned_epochs:.1f} KD-epochs"
        return text

    return _method_table(groups, column_pairs(groups), cell)


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
            cells = [format_cell([float(b[f"test_{k}"]) for b in best if number(b.get(f"test_{k}")) is not None],
                                 sum(not r.complete for r in runs)) for k in DETECTION_METRICS]
            rows.append(f"| {pair_name(pair, ds)} | {method} | " + " | ".join(cells) + " |")
    if not rows:
        return None
    head = "| pair | method | " + " | ".join(DETECTION_METRICS) + " |"
    return "\n".join([head, "|---|---|" + "---|" * len(DETECTION_METRICS)] + rows)


def heads_text(runs: Sequence[Run]) -> str:
    """``"stone1 52.00, stone2 62.00, teacher 77.00"``: each head's top-1 of the runs' last scored epoch
    holding it, mean over the runs; ``""`` without heads."""
    parts = []
    for k in stone_keys(runs) + ["acc_teacher"]:
        v = mean_of_records(runs, k, last_only=True)
        if v is not None:
            parts.append(f"{k[len('acc_'):]} {v:.2f}")
    return ", ".join(parts)


def stones_table(groups) -> Optional[str]:
    """Last scored epoch of each Block-KD method: student, every stone and the teacher, mean over seeds."""
    rows = []
    ds = several_datasets(groups)
    for pair in column_pairs(groups):
        for method in method_rows(groups):
            runs = cell_runs(groups, pair, method)
            if not stone_keys(runs):
                continue
            student = f"student {mean_of_records(runs, 'test_acc', last_only=True):.2f}"
            rows.append(f"| {pair_name(pair, ds)} | {method} | {len(runs)} | {student}, {heads_text(runs)} |")
    if not rows:
        return None
    return "\n".join(["| pair | method | seeds | last scored epoch: top-1 (%) |", "|---|---|---|---|"] + rows)


_SE_NOTE = ("Cells: difference of the means ± Welch's standard error (difference / standard error). With "
            "3 seeds a side, |difference / se| below about 2.8 is within seed noise (Welch t, about 4 "
            "degrees of freedom, 5% two-sided).")


def _diff_titles(m: str) -> Tuple[Tuple[str, str], ...]:
    """``(what, title)`` of the validation and last-epoch test score (metric ``m``) that differences are taken on."""
    return ("val_last", f"Validation {m} (last epoch)"), ("last", f"Test {m} (last epoch)")


def validation_sections(groups, baselines: Sequence[str]) -> List[str]:
    """Tables of runs that scored a validation split: validation and test score, and differences on both."""
    m = report_metric(groups)
    out = [
        f"## Validation {m}, last epoch (%)", "",
        "The validation split is held out of the training examples (`DATASET.VAL_SPLIT`): choose methods, "
        "variants and defaults on this table.", "",
        markdown_table(groups, "val_last"), "",
        f"## Test {m} at the epoch of best validation {m} (%)", "",
        markdown_table(groups, "test_at_val_best"), "",
    ]
    for base in baselines:
        for what, title in _diff_titles(m):
            diff = difference_table(groups, base, what)
            if diff:
                out += [f"## {title} minus {base} (points)", "", _SE_NOTE, "", diff, ""]
    return out


def build_markdown(runs: Sequence[Run], groups, baseline="KD", costs=None, twins: Sequence[str] = ()) -> str:
    """The whole report as markdown; ``baseline`` is one method or a list of them; ``twins``: labels
    (``AMP=bf16``) whose runs are compared with their twins without the label, method by method."""
    baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    partial = sum(not r.complete for r in runs)
    m = report_metric(groups)
    out = [
        "# Results",
        "",
        f"{len(runs)} runs ({partial} partial). Cells: mean ± sample standard deviation over seeds "
        f"(EXPERIMENT.SEED) of the test {m} (%)"
        + ("" if m != "score" else ": each column's own metric, named in its heading")
        + "; `partial`: runs still in progress or stopped early, counted with their epochs so far.",
        "",
    ]
    if any(r.has_val for r in runs):
        out += validation_sections(groups, baselines)
    out += [
        f"## Best {m} (%)",
        "",
        f"The best test {m} over epochs" + (" (a choice made on the test set: for choosing, use the validation "
                                            "tables above)" if any(r.has_val for r in runs) else "") + ".",
        "",
        markdown_table(groups, "best"),
        "",
        f"## Last-epoch {m} (%)",
        "",
        markdown_table(groups, "last"),
        "",
    ]
    if not any(r.has_val for r in runs):
        for base in baselines:
            diff = difference_table(groups, base)
            if diff:
                out += [f"## Best {m} minus {base} (points)", "", _SE_NOTE, "", diff, ""]
    for label in twins:
        for what, title in _diff_titles(m):
            table = twin_table(groups, label, what)
            if table and (what != "val_last" or any(r.has_val for r in runs)):
                out += [f"## {title}: {label} minus the same method without it (points)", "", _SE_NOTE, "", table, ""]
    det = detection_table(groups)
    if det:
        out += ["## Detection: COCO box mAP (%) at the best-AP epoch", "",
                "Detection runs (DATASET.TYPE coco) are ranked by box AP: in the tables above, and in "
                "test_acc.png, their cells are box AP (%), not top-1.", "", det, ""]
    stones = stones_table(groups)
    if stones:
        out += ["## Block-KD stepping stones", "", stones, ""]
    out += [
        "## Training cost (ms/step)",
        "",
        "Median over seeds of each run's median `ms_per_step` over its epochs, and steps per second; runs that "
        "shared the machine with others time slower, so compare within a column. For clean ratios use the "
        "benchmark command.",
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
            f"| run | pair | method | seed | epochs | best {m} | last {m} | minutes | status |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ended = r.last_epoch >= r.planned_epochs  # not complete all the same: final checkpoints missing
        status = "complete" if r.complete else (f"partial ({r.last_epoch:g}/{r.planned_epochs}"
                                                 f"{', final checkpoints missing' if ended else ''})")
        out.append(f"| {r.path} | {column_name(groups, r.pair)} | {r.method} | {r.seed} | {r.epochs} | {r.best:.2f} | "
                   f"{r.last:.2f} | {r.minutes:.1f} | {status} |")
    return "\n".join(out) + "\n"


def summary_table(rows: Sequence[Tuple[str, Optional[Run]]]) -> str:
    """One line per ``(label, run)``: student, epochs (``partial`` before the planned last), best and last
    top-1, training seconds, median ms per step, the heads of :func:`heads_text`; ``not run`` for a None run."""
    lines = ["| method | model | epochs | best top-1 (%) | last top-1 (%) | train time (s) | ms/step | "
             "last-epoch stones / teacher top-1 (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, run in rows:
        if run is None:
            lines.append(f"| {label} | - | 0 | - | - | - | - | not run |")
            continue
        epochs = f"{run.epochs}" + ("" if run.epochs >= run.planned_epochs else f" of {run.planned_epochs} (partial)")
        lines.append(f"| {label} | {run.student} | {epochs} | {run.best:.2f} | {run.last:.2f} | "
                     f"{run.seconds:.0f} | {run.ms_per_step:.0f} | {heads_text([run]) or '-'} |")
    return "\n".join(lines)
