"""The Block-KD cost model: forward FLOPs and times of its pieces, against KD's.

    cost(KD)       = 3 F(S) + F(T)
    cost(BLOCKKD)  = 3 F(S) + F(T) + sum_i [2 F(T_{j(i)+1..n} + head) + 3 F(C_i)]

(backward ~ 2x forward for trained layers, ~ 1x for frozen layers that only pass input
gradients) over the stones of the entry: ``all`` every stone, ``last:K`` the K deepest,
``sample:K`` K/n of the sum, ``every:K`` 1/K of it.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError
from .entries import Entry
from .runner import Runner

__all__ = ["count_flops", "stone_share", "blockkd_costs", "cost_model"]


def count_flops(fn: Callable[[], object]) -> Optional[int]:
    """Forward FLOPs of ``fn()`` by ``FlopCounterMode`` (None when it cannot count)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - very old torch
        return None
    try:
        with FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())
    except Exception as exc:  # noqa: BLE001 - counting is best-effort; timing still reported
        print(f"note: FLOP counting failed ({type(exc).__name__}: {exc}); cost model from times only")
        return None


def stone_share(mode: str, k: int, n: int) -> List[float]:
    """Expected number of times each of the ``n`` stones runs per step under ``STONES`` = ``mode:k``."""
    if mode == "all":
        return [1.0] * n
    if mode == "last":
        return [0.0] * (n - k) + [1.0] * k
    if mode == "sample":
        return [k / n] * n
    if mode == "every":
        return [1.0 / k] * n
    raise ValueError(f"unknown stone mode '{mode}'")


def blockkd_costs(F_s: float, F_t: float, tails: Sequence[float], conns: Sequence[float],
                  share: Sequence[float]) -> Tuple[float, float]:
    """``(cost(KD), cost(BLOCKKD))`` from forward costs: see the module docstring."""
    kd = 3.0 * F_s + F_t
    extra = sum(p * (2.0 * tl + 3.0 * c) for p, tl, c in zip(share, tails, conns))
    return kd, kd + extra


@torch.no_grad()
def cost_model(runner: Runner, e: Entry, reps: int = 5) -> dict:
    """Cost-model numbers of a BLOCKKD entry, measured on its batch (forward only, no autograd)."""
    m = e.model
    x = e.x
    if not hasattr(m, "pairs") or not hasattr(m, "connectors"):
        raise ConfigError(f"--cost-model needs a Block-KD distiller; {e.distiller} has no stepping stones")
    tmodel = m.teacher_model(x)
    tview = tmodel.staged_view()
    with runner.autocast(e):
        outs = m.sview.block_outputs(x)
    pieces: List[Tuple[str, Callable[[], object]]] = [("student", lambda: m.student(x)), ("teacher", lambda: tmodel(x))]
    for k, (i, j) in enumerate(m.pairs):
        h = outs[i]
        conn = m.connectors[k]
        with runner.autocast(e):
            c = conn(h)
        pieces.append((f"connector{k + 1}", lambda conn=conn, h=h: conn(h)))
        pieces.append((f"tail{k + 1}", lambda c=c, j=j: tview.forward_from(c, j + 1)))
    flops, times = {}, {}
    for name, fn in pieces:
        def run(fn=fn):
            with runner.autocast(e):
                return fn()
        flops[name] = count_flops(run)
        times[name] = runner.time_forward(run, reps)
    n = len(m.pairs)
    share = stone_share(m.mode, m.k, n)
    names_t = [f"tail{k + 1}" for k in range(n)]
    names_c = [f"connector{k + 1}" for k in range(n)]
    out = {
        "teacher": e.teacher, "student": e.student, "variant": e.variant, "precision": e.precision, "stones": f"{m.mode}:{m.k}" if m.mode != "all" else "all",
        "num_stones": n, "pairs": [[i + 1, j + 1] for i, j in m.pairs],
        "forward_ms": {k: round(v, 4) for k, v in times.items()},
        "forward_gflops": None, "flops_ratio_to_kd": None,
    }
    kd_t, bk_t = blockkd_costs(times["student"], times["teacher"], [times[k] for k in names_t],
                               [times[k] for k in names_c], share)
    out["time_ratio_to_kd"] = bk_t / kd_t if kd_t > 0 else None
    if all(v is not None for v in flops.values()):
        kd_f, bk_f = blockkd_costs(flops["student"], flops["teacher"], [flops[k] for k in names_t],
                                   [flops[k] for k in names_c], share)
        out["forward_gflops"] = {k: v / 1e9 for k, v in flops.items()}
        out["flops_ratio_to_kd"] = bk_f / kd_f if kd_f > 0 else None
    return out
