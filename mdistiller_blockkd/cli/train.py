"""Train a student (vanilla or distilled) as configured, mdistiller's command line.

    mdistiller-blockkd-train --cfg cifar100/kd/res56_res20 [--resume [--resume-with-changes] | --overwrite] [KEY VALUE ...]
    python -m mdistiller_blockkd train --cfg configs/cifar100/kd/res56_res20.yaml ...
    python tools/train.py --cfg configs/cifar100/kd/res56_res20.yaml ...      (in a checkout)

``--cfg`` is a YAML file or a shipped config's short name. Trailing ``KEY VALUE`` pairs
override the YAML (``SOLVER.EPOCHS 2``). Outputs go to
``LOG.PREFIX/<EXPERIMENT.PROJECT>/<EXPERIMENT.NAME or TAG>/`` (see
``mdistiller_blockkd.engine.trainer``). A folder that already holds a run is never
overwritten silently: continue it with ``--resume``, choose another ``EXPERIMENT.NAME``,
or replace it with ``--overwrite``. ``--resume`` refuses settings that differ from the
run's ``config.yaml`` where they change the result (the keys that may change are listed
in ``mdistiller_blockkd.utils.runfolder``); ``--resume-with-changes`` accepts them, and
every change is recorded in the run folder (``changes.jsonl``). Several processes: ``torchrun --nproc_per_node N
-m mdistiller_blockkd train ...`` (``SOLVER.BATCH_SIZE`` is then the batch of each
process). A user error (bad key, unknown model, missing dataset or checkpoint, NaN loss)
prints one line ``error: ...`` on stderr and exits with a non-zero status. SIGTERM, SIGUSR1 or
SIGUSR2 stops a run after its current step, which it saves (``latest_step``): it prints
``preempted`` and exits with status 75; ``--resume`` continues from that step.
"""

from __future__ import annotations

import argparse
import os
import sys

# Passive OpenMP waiting: spinning threads slow training many-fold when the CPU is shared
# (must be set before torch is imported; a value set by the user wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ..errors import ConfigError, run_cli  # noqa: E402


def parse_args(argv=None):
    """Parse ``--cfg FILE [--resume [--resume-with-changes] | --overwrite] [--import MODULE ...] [KEY VALUE ...]``."""
    parser = argparse.ArgumentParser(
        prog="mdistiller-blockkd-train",
        description="Train a student with a distiller (DISTILLER.TYPE NONE = vanilla training).",
        epilog="Example: mdistiller-blockkd-train --cfg synthetic/vanilla_resnet8 SOLVER.EPOCHS 1",
    )
    parser.add_argument("--cfg", required=True, metavar="FILE",
                        help="YAML config (mdistiller's format): a file, or a shipped config's short name "
                             "such as cifar100/blockkd/res56_res20")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from its 'latest' checkpoint (or from 'latest_step', the step a signal "
                             "or LOG.SAVE_EVERY_STEPS saved), with the settings of its config.yaml "
                             "(logging, loader workers, SOLVER.EPOCHS >= the epochs done ... may change)")
    parser.add_argument("--resume-with-changes", dest="resume_with_changes", action="store_true",
                        help="--resume, also when settings that change the result (recipe, data, models, distiller "
                             "options, seed) differ from the run's config.yaml; the changes are recorded in changes.jsonl")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run folder that already holds a run, replacing its results")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (an outside package that registers models or distillers)")
    parser.add_argument("--brief", action="store_true",
                        help="name the run's config.yaml instead of printing the whole merged config")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.EPOCHS 2 LOG.PREFIX ./output")
    args = parser.parse_args(argv)
    for flag in ("--resume", "--resume-with-changes", "--overwrite"):  # also accepted after the overrides
        if flag in args.opts:
            args.opts = [o for o in args.opts if o != flag]
            setattr(args, flag[2:].replace("-", "_"), True)
    args.resume = args.resume or args.resume_with_changes
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it; give one of them")
    return args


def main(argv=None):
    """Load the config, build data, distiller and trainer, train; return the trainer's summary."""
    args = parse_args(argv)
    from ..config import load_cfg, log_msg
    from ..data import dataset_description
    from ..engine.build import assemble, check_distiller_config
    from ..engine.task import build_task
    from ..engine.trainer import Trainer, check_fresh_start, check_resume_config, experiment_name, output_dir
    from ..registry import import_modules
    from ..utils import dist as du
    from ..utils.misc import seed_everything, set_deterministic
    from ..utils.precision import precision_name, resolve_amp, resolve_config_amp
    from ..utils.runfolder import recorded_epoch, resumable
    from ..utils.fileio import check_output_path
    from ..utils.wandb_log import require_wandb

    import_modules(args.imports)
    cfg = load_cfg(args.cfg, args.opts)
    require_wandb(cfg)  # LOG.WANDB without the [wandb] extra: one error line before any work
    if str(cfg.SOLVER.TRAINER).lower() != "base":
        raise ConfigError(f"SOLVER.TRAINER is '{cfg.SOLVER.TRAINER}'; this toolbox has one trainer: base")
    from ..detection.task import build_detection_run, check_detection_config, is_detection

    requested = str(cfg.SOLVER.AMP).strip().lower()
    resolve_config_amp(cfg)  # 'auto' -> what it means here; config.yaml records that (and --resume compares it)
    detection = is_detection(cfg)  # DATASET.TYPE coco: torchvision Faster R-CNN (docs/detection.md)
    (check_detection_config if detection else check_distiller_config)(cfg)  # before any data is read or downloaded
    folder = output_dir(cfg)
    check_output_path(folder, "the run folder (LOG.PREFIX/EXPERIMENT.PROJECT/NAME)", folder=True)
    if not args.resume:  # the trainer checks again under the folder's lock
        check_fresh_start(folder, int(cfg.SOLVER.EPOCHS), args.overwrite)
    elif resumable(folder):  # again with the epoch of its checkpoint by the trainer
        check_resume_config(folder, cfg, recorded_epoch(folder), args.resume_with_changes)
    if cfg.EXPERIMENT.DETERMINISTIC:  # before CUDA starts: cuBLAS reads its workspace setting then
        set_deterministic(True)
    info = du.init_distributed()
    try:
        def say(msg):
            if info.is_main:
                print(msg, flush=True)

        seed_everything(cfg.EXPERIMENT.SEED)
        task = None
        if detection:
            train_loader, test_loader, distiller, task, desc = build_detection_run(cfg, info.rank, info.world_size,
                                                                                   info.device)
            holdout = None
        else:
            loaders, distiller = assemble(cfg, info.rank, info.world_size, info.device)
            train_loader, test_loader, holdout = loaders.train, loaders.test, loaders.val
            task = build_task(cfg, loaders.num_classes)  # images or text (GLUE's metrics)
            desc = dataset_description(cfg)
        say(log_msg(f"data: {desc}", "INFO"))
        if args.brief:
            say(log_msg(f"config: {os.path.join(folder, 'config.yaml')} (the merged config)", "INFO"))
        else:
            say(log_msg(f"CONFIG:\n{cfg.dump()}", "INFO"))
        say(log_msg(f"{cfg.DISTILLER.TYPE} ({cfg.DISTILLER.STUDENT}"
                    + (f" from {cfg.DISTILLER.TEACHER}" if distiller.teacher is not None else "")
                    + f"); device {info.device}, precision "
                    f"{precision_name(resolve_amp(cfg.SOLVER.AMP, info.device))}"
                    + (" (SOLVER.AMP auto)" if requested == "auto" else "") + f", {info.world_size} process(es), "
                    f"batch {cfg.SOLVER.BATCH_SIZE} per process", "INFO"))
        say(log_msg(distiller.describe(), "INFO"))
        trainer = Trainer(experiment_name(cfg), distiller, train_loader, test_loader, cfg, dist_info=info,
                          holdout_loader=holdout, task=task)
        return trainer.train(resume=args.resume, overwrite=args.overwrite, accept_changes=args.resume_with_changes)
    finally:
        du.cleanup()


def cli(argv=None) -> int:
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
