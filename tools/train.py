#!/usr/bin/env python
"""Train a student (vanilla or distilled) as configured, mdistiller's command line.

    python tools/train.py --cfg configs/cifar100/kd/res56_res20.yaml [--resume] [KEY VALUE ...]

Trailing ``KEY VALUE`` pairs override the YAML (``SOLVER.EPOCHS 2``). Outputs go to
``LOG.PREFIX/<EXPERIMENT.PROJECT>/<EXPERIMENT.NAME or TAG>/`` (see
``mdistiller_blockkd.engine.trainer``). Several processes: ``torchrun --nproc_per_node N
tools/train.py ...`` (``SOLVER.BATCH_SIZE`` is then the batch of each process). A user
error (bad key, unknown model, missing dataset or checkpoint, NaN loss) prints one line
``error: ...`` on stderr and exits with a non-zero status.
"""

from __future__ import annotations

import argparse
import os
import sys

# Passive OpenMP waiting: spinning threads slow training many-fold when the CPU is shared
# (must be set before torch is imported; a value set by the user wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller_blockkd.errors import ConfigError, run_cli  # noqa: E402


def parse_args(argv=None):
    """Parse ``--cfg FILE [--resume] [KEY VALUE ...]``."""
    parser = argparse.ArgumentParser(
        description="Train a student with a distiller (DISTILLER.TYPE NONE = vanilla training).",
        epilog="Example: python tools/train.py --cfg configs/synthetic/vanilla_resnet8.yaml SOLVER.EPOCHS 1",
    )
    parser.add_argument("--cfg", required=True, metavar="FILE", help="YAML config (mdistiller's format)")
    parser.add_argument("--resume", action="store_true", help="continue the run from its 'latest' checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.EPOCHS 2 LOG.PREFIX ./output")
    args = parser.parse_args(argv)
    if "--resume" in args.opts:  # also accepted after the overrides
        args.opts = [o for o in args.opts if o != "--resume"]
        args.resume = True
    return args


def main(argv=None):
    """Load the config, build data, distiller and trainer, train; return the trainer's summary."""
    args = parse_args(argv)
    from mdistiller_blockkd.data import dataset_description, get_loaders
    from mdistiller_blockkd.engine import dist as du
    from mdistiller_blockkd.engine.build import build_distiller, check_distiller_config
    from mdistiller_blockkd.engine.cfg import load_cfg, log_msg
    from mdistiller_blockkd.engine.trainer import Trainer, experiment_name
    from mdistiller_blockkd.engine.utils import seed_everything

    cfg = load_cfg(args.cfg, args.opts)
    if str(cfg.SOLVER.TRAINER).lower() != "base":
        raise ConfigError(f"SOLVER.TRAINER is '{cfg.SOLVER.TRAINER}'; this toolbox has one trainer: base")
    check_distiller_config(cfg)  # before any data is read or downloaded
    info = du.init_distributed()
    try:
        def say(msg):
            if info.is_main:
                print(msg, flush=True)

        seed_everything(cfg.EXPERIMENT.SEED)
        loaders = get_loaders(cfg, info.rank, info.world_size)
        num_classes = loaders.num_classes
        say(log_msg(f"data: {dataset_description(cfg)}", "INFO"))
        say(log_msg(f"CONFIG:\n{cfg.dump()}", "INFO"))
        distiller = build_distiller(cfg, num_classes, info.device)
        extra = distiller.get_extra_parameters()
        say(log_msg(f"{cfg.DISTILLER.TYPE}: student {cfg.DISTILLER.STUDENT}"
                    + (f", teacher {cfg.DISTILLER.TEACHER}" if distiller.teacher is not None else "")
                    + f", extra parameters {extra / 1e6:.3f}M; device {info.device}, {info.world_size} process(es), "
                    f"batch {cfg.SOLVER.BATCH_SIZE} per process", "INFO"))
        if hasattr(distiller, "describe"):
            say(log_msg(distiller.describe(), "INFO"))
        trainer = Trainer(experiment_name(cfg), distiller, loaders.train, loaders.test, cfg, dist_info=info,
                          holdout_loader=loaders.val)
        return trainer.train(resume=args.resume)
    finally:
        du.cleanup()


if __name__ == "__main__":
    run_cli(main)
