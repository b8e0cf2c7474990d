"""Where a Block-KD step's gradient into the student's first blocks comes from.

    mdistiller-blockkd stone-grads --cfg fmnist/study600/res56_res20/blockkd [--ckpt RUN/latest] [--batches 8]

Builds the config's Block-KD distiller (its teacher checkpoint as configured; the
student and connectors fresh, or from ``--ckpt``, a run's ``latest``/``best``), then on
``--batches`` training batches computes the gradient of the loss with respect to the
student's *first-block parameters* (its stem and block 1: where every stone's gradient
arrives) for:

* ``all``: every stone (the reference ``g_all``);
* the student's own terms only (what ``every:K`` trains on its stone-free steps);
* each single stone as ``sample:1`` would draw it, with ``STONE_SCALE unbiased`` (``n``
  times its terms) and ``none``.

It prints (and with ``--json`` writes) the mean gradient norms and the mean relative
error ``|g - g_all| / |g_all|`` of each one-step estimate: an error near or above 1
means a step's direction has little to do with ``all``'s. The average of the unbiased
single-stone gradients equals ``g_all`` exactly when ``BLOCKKD.GAMMA`` is 0 (the cross
term is the only biased one); ``unbiased_mean_error`` reports it. Forward passes run in
training mode (BatchNorm statistics move, as in training); no weight is updated.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence

import torch

from ..distillers.blockkd_core import StepPlan
from ..errors import ConfigError, run_cli


def first_block_parameters(distiller, image: torch.Tensor) -> List[torch.nn.Parameter]:
    """The student parameters that the stem and first block of its staged view use (found by autograd)."""
    view = distiller.sview
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    out = view.block(0, view.stem(image[:2]))
    grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    params = [p for p, g in zip(params, grads) if g is not None]
    if not params:
        raise ConfigError("the student's staged view has no stem or first-block parameters to measure")
    return params


def stone_gradients(distiller, batches, params, epoch: float = float("inf")) -> Dict[str, object]:
    """The statistics of the module docstring for ``batches`` of ``(image, target)``."""
    n = distiller.num_stones

    def grad(image, target, active, factor):
        s, stones, t = distiller._forward(image, active)
        w = [distiller.stone_weights[k] * factor for k in active]
        cross = w if distiller.opts.loss.weight_cross else [factor] * len(active)
        loss = distiller.loss_terms(s, stones, t, target, StepPlan(active, w, cross), epoch)
        g = torch.autograd.grad(sum(loss.values()), params, allow_unused=True)
        return torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten() for gi, p in zip(g, params)])

    rows = {"all": [], "student_terms_only": [], "sample1_unbiased": [], "sample1_none": []}
    err = {k: [] for k in rows if k != "all"}
    mean_err, per_stone = [], [[] for _ in range(n)]
    distiller.train()
    for image, target in batches:
        g_all = grad(image, target, list(range(n)), 1.0)
        g_own = grad(image, target, [], 1.0)
        g_unb = [grad(image, target, [k], float(n)) for k in range(n)]
        g_none = [grad(image, target, [k], 1.0) for k in range(n)]
        ref = max(g_all.norm().item(), 1e-20)
        rows["all"].append(g_all.norm().item())
        rows["student_terms_only"].append(g_own.norm().item())
        rows["sample1_unbiased"].append(sum(g.norm().item() for g in g_unb) / n)
        rows["sample1_none"].append(sum(g.norm().item() for g in g_none) / n)
        err["student_terms_only"].append((g_own - g_all).norm().item() / ref)
        err["sample1_unbiased"].append(sum((g - g_all).norm().item() for g in g_unb) / n / ref)
        err["sample1_none"].append(sum((g - g_all).norm().item() for g in g_none) / n / ref)
        mean_err.append((torch.stack(g_unb).mean(0) - g_all).norm().item() / ref)
        for k, g in enumerate(g_unb):
            per_stone[k].append((g - g_own).norm().item())

    def avg(v):
        return sum(v) / len(v)

    return {
        "num_stones": n,
        "batches": len(rows["all"]),
        "grad_norm": {k: avg(v) for k, v in rows.items()},
        "relative_error_vs_all": {k: avg(v) for k, v in err.items()},
        "unbiased_mean_error": avg(mean_err),
        "stone_gradient_norm_unbiased": {f"stone{sid}": avg(v) for sid, v in zip(distiller.stone_ids, per_stone)},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdistiller-blockkd stone-grads", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, metavar="FILE", help="a BLOCKKD config (file or shipped short name)")
    p.add_argument("--ckpt", metavar="FILE", help="a run's training state (latest/best) for student and connectors")
    p.add_argument("--batches", type=int, default=8, help="training batches to average over (default 8)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from ..config import load_cfg, resolve_config
    from ..data import get_loaders
    from ..engine.build import build_distiller
    from ..utils.checkpoint import load_checkpoint
    from ..utils.fileio import atomic_write_text
    from ..utils.misc import seed_everything

    if args.batches < 1:
        raise ConfigError(f"--batches is {args.batches}; use 1 or more")
    cfg = load_cfg(resolve_config(args.cfg), args.opts)
    if str(cfg.DISTILLER.TYPE).upper() != "BLOCKKD":
        raise ConfigError(f"DISTILLER.TYPE is '{cfg.DISTILLER.TYPE}'; stone-grads measures a BLOCKKD config")
    seed_everything(cfg.EXPERIMENT.SEED)
    loaders = get_loaders(cfg)
    distiller = build_distiller(cfg, loaders.num_classes)
    if args.ckpt:
        state = load_checkpoint(args.ckpt)
        if not isinstance(state, dict) or "model" not in state:
            raise ConfigError(f"--ckpt '{args.ckpt}' is not a training state (no 'model'); give a run's latest or best")
        missing, unexpected = distiller.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise ConfigError(f"--ckpt '{args.ckpt}' does not fit this config's distiller ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected keys)")
    batches = []
    for image, target in loaders.train:
        batches.append((image, target))
        if len(batches) == args.batches:
            break
    out = stone_gradients(distiller, batches, first_block_parameters(distiller, batches[0][0]))
    out["config"], out["checkpoint"] = args.cfg, args.ckpt or "fresh student and connectors"
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    return 0


def cli(argv=None) -> int:
    """Console entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
