"""Weights & Biases logging of a run (``LOG.WANDB True``; the optional ``[wandb]`` extra).

Rank 0 logs the scalars that go to tensorboard, under the same names and global steps
(``train/<term>`` and ``train/lr`` every ``LOG.TENSORBOARD_FREQ`` steps, ``epoch/<metric>``
after every epoch), the merged config, and ``best_acc`` in the run summary.

The run is ``LOG.WANDB_PROJECT`` (default ``EXPERIMENT.PROJECT``, as in mdistiller) of
``LOG.WANDB_ENTITY`` (default: wandb's), named after the run (``EXPERIMENT.NAME`` or
``TAG``), tagged with ``EXPERIMENT.TAG``'s comma-separated words; ``LOG.WANDB_MODE``
``online`` or ``offline`` (default: wandb's own, the ``WANDB_MODE`` variable, else online).
wandb's files go to ``$WANDB_DIR`` when set, else to the run folder (``wandb/``).

The wandb run id is kept in the run folder (``wandb_run_id``): ``--resume`` continues the
same wandb run (``resume="allow"``); a fresh start (or ``--overwrite``) starts a new one.
The steps a killed run logged after its last checkpoint are trained again by the resumed
run; wandb ignores (with a warning) a step below the last one it holds.

mdistiller's default is ``LOG.WANDB True``; this toolbox's is False, so an mdistiller
YAML that leaves the key unset logs to tensorboard only.
"""

from __future__ import annotations

import os
import secrets
import string
from typing import Dict, Optional

from ..errors import ConfigError
from .fileio import atomic_write_text

__all__ = ["ID_FILE", "require_wandb", "WandbRun", "open_wandb"]

#: the file of the run folder that holds the wandb run id (continued by ``--resume``)
ID_FILE = "wandb_run_id"


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("LOG.WANDB is True but wandb is not installed; install the [wandb] extra "
                          "(pip install 'mdistiller_blockkd[wandb]') or set LOG.WANDB False") from None
    return wandb


def require_wandb(cfg) -> None:
    """Raise the one-line :class:`ConfigError` when ``LOG.WANDB`` asks for wandb and it is not installed."""
    if cfg.LOG.WANDB:
        _import_wandb()


class WandbRun:
    """The open wandb run of a training run: :meth:`log` scalars at a step, :meth:`summary`, :meth:`finish`."""

    def __init__(self, run):
        self.run = run

    def log(self, values: Dict[str, float], step: int) -> None:
        self.run.log({k: float(v) for k, v in values.items()}, step=int(step))

    def summary(self, **values) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _run_id(folder: str, resume: bool) -> str:
    path = os.path.join(folder, ID_FILE)
    if resume and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as wandb's
    atomic_write_text(path, run_id + "\n")
    return run_id


def open_wandb(cfg, folder: str, name: str, resume: bool) -> Optional[WandbRun]:
    """Start (or, with ``resume``, continue) the wandb run of the run in ``folder``; None when ``LOG.WANDB`` is off.

    A run wandb cannot start (not logged in, no network in online mode) raises one
    :class:`ConfigError` line.
    """
    if not cfg.LOG.WANDB:
        return None
    wandb = _import_wandb()
    import yaml

    log = cfg.LOG
    run_id = _run_id(folder, resume)
    tags = [t.strip() for t in str(cfg.EXPERIMENT.TAG).split(",") if t.strip()]
    try:
        run = wandb.init(project=str(log.WANDB_PROJECT) or str(cfg.EXPERIMENT.PROJECT),
                         entity=str(log.WANDB_ENTITY) or None, mode=str(log.WANDB_MODE).lower() or None,
                         name=name, tags=tags, config=yaml.safe_load(cfg.dump()), id=run_id, resume="allow",
                         dir=os.environ.get("WANDB_DIR") or folder)
    except wandb.errors.Error as e:
        raise ConfigError(f"LOG.WANDB: wandb could not start the run ({' '.join(str(e).split())[:300]}); log in "
                          "with 'wandb login', or set LOG.WANDB_MODE offline (sync later with 'wandb sync')") from None
    return WandbRun(run)
