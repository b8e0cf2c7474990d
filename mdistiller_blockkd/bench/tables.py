"""The benchmark's results: one record per entry (the ``--json`` schema) and plain-text tables."""

from __future__ import annotations

import os
import platform
import statistics
from typing import List, Optional

import torch

from ..utils.precision import precision_name
from .entries import Entry
from .memory import max_batch
from .profile import PARTS

__all__ = ["format_table", "device_description", "results_of", "profile_table", "results_table", "cost_table"]


def _fmt(v, nd=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def format_table(rows: List[List[str]], header: List[str]) -> str:
    """Plain fixed-width table."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine() or 'unknown'}, {os.cpu_count()} logical cores)"


def results_of(entries: List[Entry], batch_size: int, budget_mib: Optional[float] = None) -> List[dict]:
    """One result dict per entry (the ``--json`` schema).

    ``ratio_to_kd``: the median over plain ``KD``'s on the same pair *at the same precision and
    layout*; ``ratio_to_fp32``: over the entry's fp32 twin (same pair, distiller, variant and
    layout, ``SOLVER.AMP off``); ``None`` where that entry was not run. With ``budget_mib``,
    ``max_batch_in_budget``: the largest batch whose peak memory fits ``budget_mib``
    (:func:`~.memory.max_batch` from the figures at ``batch_size`` and half of it).
    """
    med = {e.key: statistics.median(e.times_ms) for e in entries}
    out = []
    for e in entries:
        ms = med[e.key]
        kd = med.get((e.teacher, e.student, "KD", "", e.precision))
        fp32 = med.get((e.teacher, e.student, e.distiller, e.variant, "fp32" + (" CL" if e.channels_last else "")))
        out.append({
            "teacher": e.teacher, "student": e.student, "distiller": e.distiller, "variant": e.variant,
            "precision": precision_name(e.amp), "channels_last": e.channels_last,
            "batch_size": batch_size, "ms_per_step": round(ms, 4), "images_per_s": round(batch_size / (ms / 1000.0), 2),
            "peak_mem_mb": None if e.peak_mem_mb is None else round(e.peak_mem_mb, 2),
            "ratio_to_kd": None if kd is None else round(ms / kd, 4),
            "ratio_to_fp32": None if fp32 is None or e.amp == "off" else round(ms / fp32, 4),
        })
    mem = {e.key: e.peak_mem_mb for e in entries}
    for r, e in zip(out, entries):
        kd = mem.get((e.teacher, e.student, "KD", "", e.precision))
        r["mem_ratio_to_kd"] = None if not kd or e.peak_mem_mb is None else round(e.peak_mem_mb / kd, 4)
        if budget_mib is not None:
            r["peak_mem_half_batch_mb"] = round(e.peak_mem_half_mb, 2)
            r["max_batch_in_budget"] = max_batch(e.peak_mem_half_mb, batch_size // 2, e.peak_mem_mb, batch_size,
                                                 budget_mib)
    return out


def profile_table(profiles: List[dict]) -> str:
    """One row per part (forward and backward of each), one column per profiled entry: ms and share."""
    order = [f"{p} {d}" for p in PARTS[:5] for d in ("forward", "backward")] + ["optimizer", "backward other"]
    seen = {k for p in profiles for k in p["parts_ms"]}
    order += sorted(seen - set(order))
    header = ["part"] + [f"{p['distiller']}{' ' + p['variant'] if p['variant'] else ''} ({p['precision']})" for p in profiles]
    rows = []
    for part in order:
        if part not in seen:
            continue
        row = [part]
        for p in profiles:
            v = p["parts_ms"].get(part)
            row.append("-" if v is None else f"{v:.1f} ({100 * v / p['profiled_ms']:.0f}%)")
        rows.append(row)
    rows.append(["total"] + [f"{p['profiled_ms']:.1f}" for p in profiles])
    return format_table(rows, header)


def saved_table(saved: List[dict]) -> str:
    """Bytes autograd keeps for backward, per part (rows) and entry (columns), in MiB."""
    parts = [p for p in ("student", "connectors", "stones", "losses") if any(p in s["parts"] for s in saved)]
    header = ["saved for backward (MiB)"] + [f"{s['distiller']}{' ' + s['variant'] if s['variant'] else ''} ({s['precision']})"
                                             for s in saved]
    rows = [[part] + [_fmt(s["parts"].get(part, {}).get("bytes", 0) / 2 ** 20, 1) for s in saved] for part in parts]
    rows.append(["total activations"] + [_fmt(sum(v["bytes"] for v in s["parts"].values()) / 2 ** 20, 1) for s in saved])
    rows.append(["(parameters, kept anyway)"] + [_fmt(sum(v["param_bytes"] for v in s["parts"].values()) / 2 ** 20, 2)
                                                 for s in saved])
    return format_table(rows, header)


def results_table(results: List[dict]) -> str:
    """The main table: one row per entry with its precision, time, throughput, memory and ratios."""
    header = ["teacher", "student", "distiller", "variant", "precision", "batch", "ms/step", "images/s", "peak MiB",
              "x KD mem", "x KD", "x fp32"]
    rows = [[r["teacher"], r["student"], r["distiller"], r["variant"] or "-",
             r["precision"] + (" CL" if r["channels_last"] else ""), r["batch_size"], _fmt(r["ms_per_step"], 2),
             _fmt(r["images_per_s"], 1), _fmt(r["peak_mem_mb"], 1), _fmt(r.get("mem_ratio_to_kd"), 2),
             _fmt(r["ratio_to_kd"], 2), _fmt(r["ratio_to_fp32"], 2)] for r in results]
    if any("max_batch_in_budget" in r for r in results):
        header.append("batch in budget")
        for row, r in zip(rows, results):
            row.append(_fmt(r.get("max_batch_in_budget")))
    return format_table(rows, header)


def cost_table(costs: List[dict]) -> str:
    """The cost model's table: GFLOPs of the pieces and the three ratios to KD (FLOPs, forward times, measured)."""
    rows = []
    for c in costs:
        g = c["forward_gflops"]
        tails = [k for k in c["forward_ms"] if k.startswith("tail")]
        rows.append([c["teacher"], c["student"], c["variant"] or "-", c["precision"], c["stones"],
                     "-" if g is None else f"{g['student']:.3f}", "-" if g is None else f"{g['teacher']:.3f}",
                     "-" if g is None else " ".join(f"{g[k]:.3f}" for k in tails),
                     _fmt(c["flops_ratio_to_kd"], 2), _fmt(c["time_ratio_to_kd"], 2), _fmt(c["measured_ratio_to_kd"], 2)])
    return format_table(rows, ["teacher", "student", "variant", "precision", "stones", "GFLOP S", "GFLOP T",
                               "GFLOP tails", "x KD (FLOPs)", "x KD (fwd times)", "x KD (measured)"])
