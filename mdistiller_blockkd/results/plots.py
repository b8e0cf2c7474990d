"""The report's plots (matplotlib, Agg backend): score per epoch, Block-KD's stones, score against cost.

A run's score is :attr:`.runs.Run.score` (top-1; box AP for detection; a GLUE task's own metric), and
each panel's y axis names it; the stones' plots show top-1 (the heads' only score).

Every figure is a grid of at most :data:`PANELS_PER_ROW` panels a row; a panel holds at most
:data:`MAX_SERIES` series, each with its own colour and marker, and its legend below the
axes. A pair's methods are split by family (baselines / Block-KD variants).
:func:`write_plots` writes them all for the report command and the demo.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from ..utils.fileio import atomic_write_bytes_from
from .runs import (Pair, cell_runs, column_pairs, mean_curve, method_rows, pair_name, run_cost, several_datasets,
                   stone_keys, warn)
from .stats import mean_std


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


#: Characters a panel title's line holds at font size 9 (panels sit side by side, about 4.5 in wide).
TITLE_WIDTH = 52


def _wrap_title(text: str, width: int = TITLE_WIDTH) -> str:
    """``text`` on lines of at most ``width`` characters, so side-by-side titles never run into each other; a long
    name breaks after ``->``, ``,`` and ``/`` (``hf:`` folders, ``timm:`` options) before it breaks inside a word."""
    lines = textwrap.wrap(re.sub(r"(->|,|/)(?! )", "\\1\u200b ", text), width)  # a marked space to break at
    return "\n".join(line.replace("\u200b ", "").replace("\u200b", "") for line in lines)


def plot_test_acc(groups, out_dir: str, plt) -> str:
    """``test_acc.png``: per pair, a panel of baselines and one of Block-KD variants (at most
    :data:`MAX_SERIES` lines each); one line (mean over seeds, ±std band) of the test score per method."""
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
        ax.set_title(_wrap_title(title + ("" if not late else " (second half's range)")), fontsize=9)
        _style(ax, len(methods), f"test {cell_runs(groups, pair, methods[0])[0].metric} (%)")
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
    """``cost_acc.png``: per pair, last-epoch test score (mean ± std over seeds) against training cost.

    Cost = the benchmark's step cost in KD steps x epochs (KD-epochs), so KD trained twice
    as long and Block-KD at twice KD's step cost stand at the same x. A pair's baselines and
    its Block-KD variants get a panel each; both panels draw the pair's Pareto front over all
    of its methods (the best accuracy at each cost), with the methods on it named. None
    without costs.
    """
    if not costs:
        return None
    points: Dict[Pair, Dict[str, Tuple[float, float, float, int]]] = {}
    metrics: Dict[Pair, str] = {}
    for pair in column_pairs(groups):
        for method in method_rows(groups):
            runs = cell_runs(groups, pair, method)
            ratio = run_cost(runs[0], costs) if runs else None
            if ratio is None:
                continue
            m, sd = mean_std([r.last for r in runs])
            points.setdefault(pair, {})[method] = (ratio * runs[0].planned_epochs, m, sd, len(runs))
            metrics[pair] = runs[0].metric
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
        ax.set_title(_wrap_title(title), fontsize=9)
        ax.set_xlabel("training cost (KD-epochs)")
        ax.set_ylabel(f"test {metrics[pair]}, last epoch (%)")
        ax.grid(alpha=0.3)
        _legend_below(ax, len(methods) + 1)
    path = os.path.join(out_dir, "cost_acc.png")
    _save(fig, path, plt)
    return path


def plot_stones(groups, out_dir: str, plt) -> List[str]:
    """``stones_<pair>.png`` per pair with Block-KD runs: student, stones and teacher accuracy per epoch,
    one panel per Block-KD variant, :data:`PANELS_PER_ROW` panels to a row."""
    paths = []
    for pair in column_pairs(groups):
        methods = [m for m in method_rows(groups) if m.split(" ", 1)[0] == "BLOCKKD" and cell_runs(groups, pair, m)
                   and stone_keys(cell_runs(groups, pair, m))]  # detection Block-KD scores no stones
        if not methods:
            continue
        fig, axes = _grid(plt, len(methods), height=4.0)
        for ax, method in zip(axes, methods):
            runs = cell_runs(groups, pair, method)
            series = ([("test_acc", "student")] + [(k, k[len("acc_"):]) for k in stone_keys(runs)]
                      + [("acc_teacher", "teacher")])
            drawn = 0
            for key, label in series:
                xs, mean, _ = mean_curve(runs, key)
                if xs:  # the style follows the series (stone k, teacher), so panels with fewer stones match
                    style = 0 if key == "test_acc" else 9 if key == "acc_teacher" else int(key[len("acc_stone"):])
                    ax.plot(xs, mean, label=label, linewidth=1.3, **_series_style(style, xs))
                    drawn += 1
            label = f"{method} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"  # wrapped: panels sit side by side
            ax.set_title(_wrap_title(pair_name(pair, several_datasets(groups))) + "\n" + _wrap_title(label),
                         fontsize=9)
            _style(ax, drawn)
        stem = f"stones_{_safe(pair[1] or 'plain')}_{_safe(pair[2])}"
        if several_datasets(groups):
            stem += f"_{_safe(pair[0])}"
        path = os.path.join(out_dir, f"{stem}.png")
        _save(fig, path, plt)
        paths.append(path)
    return paths


def write_plots(groups, out_dir: str, plt, costs=None) -> List[str]:
    """Every plot of ``groups`` into ``out_dir`` (made if missing): ``test_acc.png``, ``stones_<pair>.png``
    and, with ``costs``, ``cost_acc.png``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [plot_test_acc(groups, out_dir, plt)] + plot_stones(groups, out_dir, plt)
    cost_png = plot_cost(groups, costs, out_dir, plt)
    if cost_png:
        paths.append(cost_png)
    return paths
