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
from typing import Optional, Sequence

from . import doc_parser
from ..distillers.blockkd_grads import first_block_parameters, stone_gradients
from ..errors import ConfigError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser("mdistiller-blockkd stone-grads", __doc__, "Builds the config's")
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
    from ..utils.checkpoint import load_checkpoint, load_distiller_state
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
        load_distiller_state(distiller, state["model"], args.ckpt)
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
