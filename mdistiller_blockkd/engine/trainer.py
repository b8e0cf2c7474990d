"""The one training loop shared by every distiller (mdistiller's ``BaseTrainer``, extended).

Recipe (as in mdistiller)
    SGD on ``distiller.get_learnable_parameters()`` (``SOLVER.LR``, ``MOMENTUM``,
    ``WEIGHT_DECAY``); the learning rate is set at the start of every epoch to
    ``LR * LR_DECAY_RATE ** (number of LR_DECAY_STAGES s with epoch > s)``; epochs run
    1..``SOLVER.EPOCHS``; each step calls ``distiller(image=, target=, epoch=)`` and
    minimises the sum of the means of the returned loss values.

Per epoch
    evaluation on the validation set (the task's metrics: :mod:`.task`): top-1, top-5 and cross-entropy of the student,
    plus top-1 of every extra head ``distiller.eval_logits(image)`` returns (Block-KD's
    stepping stones, its teacher) as ``acc_<head>``; the epoch's checkpoints; then one
    JSON line in ``metrics.jsonl`` (epoch, lr, train_loss, each loss term, train_acc,
    test_acc, test_acc_top5, test_loss, the ``acc_<head>`` values, best_acc,
    epoch_time_s, ms_per_step, and ``teacher_folded`` when the distiller computes teacher
    outputs: whether its BatchNorms were folded, :attr:`Distiller.teacher_folded`); a
    block in ``worklog.txt``; tensorboardX scalars (``train.events``; also every
    ``LOG.TENSORBOARD_FREQ`` steps; the x axis is the global step); with ``LOG.WANDB``
    the same scalars, the config and ``best_acc`` in a wandb run (:mod:`..utils.wandb_log`).

Validation split (``holdout_loader``, from ``DATASET.VAL_SPLIT``)
    when given, the student is also scored every epoch on training images held out of
    training: ``val_acc``, ``val_acc_top5``, ``val_loss`` in ``metrics.jsonl`` (the task's
    ``validate``; text: GLUE's ``val_<metric>``). The ``best`` checkpoints are then chosen by
    the task's validation score (``val_score_key``: top-1; CoLA's Matthews ...), and ``best_acc`` is the
    test top-1 *at that epoch* (model selection never looks at the test set);
    ``best_val_acc`` is recorded too. Without it, ``best`` is the epoch of the best test
    top-1, as in mdistiller.

Output folder ``LOG.PREFIX/<EXPERIMENT.PROJECT>/<EXPERIMENT.NAME or EXPERIMENT.TAG>/``
    ``config.yaml`` (the merged config), ``metrics.jsonl``, ``worklog.txt``,
    ``train.events/``, and checkpoints written atomically at the end of every epoch:

    * ``latest`` -- the training state: ``epoch``, ``model`` (the distiller's state dict
      *without* the teacher's weights, which are rebuilt from their own checkpoint),
      ``optimizer``, ``best_acc``, ``scaler`` (fp16 grad scaler), ``rng`` (one RNG
      snapshot per rank: python, numpy, torch CPU, the CUDA device, the train loader's
      generator), ``world_size``, ``record`` (the epoch's ``metrics.jsonl`` record);
      ``best`` -- the same at the best epoch;
      ``epoch_<n>`` every ``LOG.SAVE_CHECKPOINT_FREQ`` epochs;
    * ``student_latest``, ``student_best``, ``student_<n>`` -- ``{"model": student
      state dict}``, the teacher format (student only: no connector, no teacher);
    * ``ckpt_epoch_<EPOCHS>.pth`` after the last epoch -- the final student in the
      teacher format under mdistiller's teacher file name, so a vanilla run whose
      folder is ``download_ckpts/cifar_teachers/<name>_vanilla`` produces exactly the
      file distillation configs look for;
    * ``latest_step`` -- the mid-epoch checkpoint (see Preemption), deleted once its epoch's
      ``latest`` is written.

    ``latest`` is the last checkpoint written and the ``metrics.jsonl`` record comes after
    it, so a record of epoch *k* means that every file of epoch *k* exists; a killed run
    loses at most the epoch in progress. A run of *N* epochs is finished when the record
    of epoch *N* and ``latest``, ``student_latest``, ``ckpt_epoch_<N>.pth`` are there
    (:func:`~mdistiller_blockkd.utils.runfolder.run_finished`, the test of the study and
    report commands). ``changes.jsonl`` and ``config_to_epoch_<k>.yaml``: see Resume.

No lost runs
    a fresh start never replaces a finished run: in a folder that already holds checkpoints or
    epoch records it stops with a :class:`~mdistiller_blockkd.errors.ConfigError` offering
    ``--resume``, another ``EXPERIMENT.NAME`` or ``--overwrite`` (``overwrite=True``, which
    deletes the old checkpoints first; a fresh start also deletes an old ``changes.jsonl``
    and ``config_to_epoch_<k>.yaml``). While a run trains, rank 0 holds a lock on its
    folder (:class:`~mdistiller_blockkd.utils.fileio.FolderLock`, released by the OS when
    the process dies), so a second process started on the same folder stops with an error.
    Once it holds the lock, a run deletes the temporary files of atomic writes that a
    killed process left there (SIGKILL; other kills remove their own).

Preemption (stop signals, ``LOG.SAVE_EVERY_STEPS``)
    While :meth:`Trainer.train` runs in the main thread, SIGTERM, SIGUSR1 (``sbatch
    --signal=USR1@<s>``) and SIGUSR2 (submitit's) do not unwind the run
    (:func:`~mdistiller_blockkd.errors.stop_signals_deferred`): the current step finishes, rank 0
    writes ``latest_step`` atomically, the run logs ``preempted at epoch E step S/N (SIGNAME)
    ...; resume with --resume`` and raises :class:`~mdistiller_blockkd.errors.Preempted`, which a
    command turns into exit status :data:`~mdistiller_blockkd.errors.PREEMPTED_EXIT` (75, "try
    again": the status a batch script requeues on; submitit requeues its job by itself). A signal
    during the evaluation or the epoch's checkpoints stops the run after them (``latest`` is then
    the position). A second signal raises :class:`~mdistiller_blockkd.errors.Terminated` at once (exit
    143, back to the last checkpoint). Loader workers ignore the signals (Slurm signals every
    process of a job); the run stops them. ``LOG.SAVE_EVERY_STEPS N`` (0 = off) writes
    ``latest_step`` after every N-th step of an epoch too (not after its last: ``latest`` follows),
    so a SIGKILL loses at most N steps.

    ``latest_step`` is the training state of ``latest`` (``epoch`` is the epoch *in progress*)
    plus ``step``, ``steps``, the epoch's first learning rate ``lr``, and ``position``: per rank,
    the data generators' states as the epoch began (``epoch_start``; the sample order itself
    comes from ``EXPERIMENT.SEED`` and the epoch through the ``DistributedSampler``, so the
    step is the position) and the running sums of the epoch's train metrics (with the rows
    not yet summed, so the float64 sums are the same); ``rng`` holds each rank's RNGs at the
    step. Every rank saves its own position (gathered to rank 0, which writes the file); with
    several processes they agree on the stop at the loss check points (one collective), so
    all stop at the same step. A non-finite loss is raised, never saved.

Resume (``resume=True``)
    restores the distiller, optimizer, scaler, epoch, best accuracy and every RNG from
    ``latest`` -- or from ``latest_step`` when it is of the epoch after ``latest``'s (one of
    an earlier epoch, left by a kill just after ``latest``, is deleted; one written by another
    number of processes is refused with a :class:`~mdistiller_blockkd.errors.CheckpointError`) --,
    drops ``metrics.jsonl`` lines of later epochs and continues. From ``latest_step``, the
    epoch restarts its loader with the generators as the epoch began, reads the first *S*
    batches again and drops them (loader workers then draw their augmentation as before: their
    RNG streams live in other processes and cannot be saved), sets every RNG as it was after
    step *S* and continues with step *S+1*: the run ends with the weights and ``metrics.jsonl``
    (timing aside) of an uninterrupted run, under the conditions below. Checkpoints
    hold CPU tensors only (see :func:`~mdistiller_blockkd.utils.checkpoint.save_checkpoint`),
    so they load on any machine. A run killed after epoch *k* and resumed ends with
    exactly the weights of an uninterrupted run (bit for bit) when

    * the data order is restorable: ``DATASET.NUM_WORKERS 0``, or workers that are
      recreated each epoch (persistent loader workers keep their own RNG streams, which a
      new process cannot restore);
    * it resumes with the same number of processes;
    * on CUDA, ``EXPERIMENT.DETERMINISTIC True``: :func:`~mdistiller_blockkd.utils.misc.set_deterministic`
      (``torch.use_deterministic_algorithms``, deterministic cuDNN without its benchmark,
      ``CUBLAS_WORKSPACE_CONFIG``, set by the train command before CUDA starts), and no
      operation without a deterministic CUDA kernel ran: torch warns, naming each one
      that did. Known ones: the backward of bilinear up-sampling (a Block-KD connector
      whose student map is smaller than the teacher's; ``describe()`` gives each stone's
      strides) and of torchvision's ``roi_align`` (detection). Without it, cuDNN picks its
      kernels per process and atomic adds sum in any order: a resumed run continues the
      same recipe, but not the same bits.

    On the CPU the first two suffice.

    A run stopped after epoch *k*'s checkpoints but before its record gets that record
    back from ``latest`` (written to ``metrics.jsonl`` before epoch *k+1*); a record
    missing for another reason is named in the log and ``worklog.txt``.

    The configuration must be the run's own (``config.yaml``) up to the keys that do
    not change the result (:mod:`mdistiller_blockkd.utils.runfolder` holds both lists):
    ``EXPERIMENT.PROJECT / NAME / TAG / DETERMINISTIC``, ``LOG.*``,
    ``DATASET.NUM_WORKERS``, ``DATASET.TEST.BATCH_SIZE``, ``DATASET.DOWNLOAD``,
    ``DISTILLER.FOLD_TEACHER_BN``, ``SOLVER.CHANNELS_LAST``, ``BLOCKKD.BATCH_STONES``,
    ``BLOCKKD.RECOMPUTE``, ``BLOCKKD.SAVE_MASKS``,
    and ``SOLVER.EPOCHS`` when it is at least the epochs done. Any other difference
    (recipe, data, models, distiller options, seed) raises one
    :class:`~mdistiller_blockkd.errors.ConfigError` line listing ``KEY: old -> new``,
    unless ``accept_changes=True`` (``--resume-with-changes``). Every change, of either
    kind, is recorded: a line in ``changes.jsonl`` (``from_epoch``, ``time``, each
    key's old and new value and whether it changes the result), the ``config.yaml`` of
    the earlier epochs kept as ``config_to_epoch_<k>.yaml``, and a line in
    ``worklog.txt``; ``config.yaml`` then holds the settings the run continues with.

Mixed precision and layout
    ``SOLVER.AMP``: ``off``, ``bf16`` or ``fp16`` (``torch.autocast`` on the device type;
    fp16 uses ``torch.amp.GradScaler``; bf16 on a GPU older than Ampere, which emulates
    it, logs a warning). ``SOLVER.CHANNELS_LAST`` converts the models
    and every input batch to channels-last.

Distributed (``torchrun``; see :mod:`.dist`)
    the distiller is wrapped in ``DistributedDataParallel`` (``find_unused_parameters =
    distiller.has_unused_parameters``); ``SOLVER.BATCH_SIZE`` is the batch *per process*
    (the effective batch is ``BATCH_SIZE * WORLD_SIZE``; the learning rate is not
    rescaled); metrics are exact sums over all ranks; BatchNorm buffers are taken from
    rank 0 before every evaluation; only rank 0 prints, logs and writes files (resume
    needs ``LOG.PREFIX`` on a file system every rank can read).

Non-finite losses
    Each step's loss terms stay on the device; they are copied to the host at *check
    points*: every step on CPU (where the copy costs nothing), every
    :data:`CUDA_CHECK_EVERY` steps and at tensorboard / epoch boundaries on CUDA (one
    host synchronisation per check). The first non-finite total loss raises
    :class:`~mdistiller_blockkd.errors.TrainingError` naming the epoch, the step and the
    value of every loss term, and what to check for the terms that went non-finite (only
    box regression terms point at the box annotations); no checkpoint of that epoch is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, Preempted, TrainingError, stop_signals_deferred
from ..utils import dist as du
from ..config import log_msg
from ..utils.checkpoint import load_checkpoint, load_distiller_state, save_checkpoint
from ..utils.console import progress, progress_settings
from ..utils.wandb_log import WandbRun, open_wandb
from ..utils.precision import AMP_DTYPES, autocast, resolve_amp
from .optim import build_optimizer, train_step
from .task import ClassificationTask, evaluate_model
from ..utils.fileio import FolderLock, read_json_lines, remove_temporaries
from ..utils.misc import (
    EventFileGuard,
    append_json_line,
    append_text,
    atomic_write_text,
    get_rng_state,
    json_safe,
    set_deterministic,
    set_rng_state,
)
from ..utils.runfolder import (  # experiment_name, output_dir: re-exported (see __all__)
    METRICS, STEP_CHECKPOINT, ConfigChange, describe_changes, experiment_name, final_files, output_dir, resume_changes,
)

__all__ = ["Trainer", "evaluate_model", "check_fresh_start", "check_resume_config", "run_checkpoints",
           "experiment_name", "output_dir", "learning_rate", "adjust_learning_rate", "CUDA_CHECK_EVERY"]

#: On CUDA, loss values are copied to the host (and checked) every this many steps.
CUDA_CHECK_EVERY = 25


#: Checkpoint files a run writes (``epoch_<n>``, ``student_<n>``, ``ckpt_epoch_<n>.pth`` too).
_CKPT_NAMES = ("latest", "best", "student_latest", "student_best", STEP_CHECKPOINT)
_CKPT_PATTERN = re.compile(r"^(epoch_\d+|student_\d+|ckpt_epoch_\d+\.pth)$")
#: The config of a resumed run's earlier epochs (see :meth:`Trainer._record_changes`).
_KEPT_CONFIG = re.compile(r"^config_to_epoch_\d+\.yaml$")


def check_fresh_start(folder: str, epochs: int, overwrite: bool = False) -> List[str]:
    """Check that a fresh run may start in ``folder``; return the checkpoints ``overwrite`` would replace.

    Raises :class:`ConfigError` (one line offering ``--resume``, a new
    ``EXPERIMENT.NAME`` or ``--overwrite``) when the folder holds a run -- checkpoints or
    epoch records -- and ``overwrite`` is false, and always when ``ckpt_epoch_<epochs>.pth``
    is there without the ``latest`` of a run (a teacher file someone put there). Reads only.
    """
    final = os.path.join(folder, f"ckpt_epoch_{epochs}.pth")
    if os.path.isfile(final) and not os.path.isfile(os.path.join(folder, "latest")):
        raise ConfigError(
            f"'{final}' already exists and was not written by a run in '{folder}' (no 'latest' there); "
            "move it away, or set EXPERIMENT.NAME / LOG.PREFIX to another output folder"
        )
    ckpts = run_checkpoints(folder)
    records = read_json_lines(os.path.join(folder, METRICS), warnings=[], skip_damaged=True)
    if (ckpts or records) and not overwrite:
        raise ConfigError(
            f"'{folder}' already holds a run ({len(records)} epoch(s) in metrics.jsonl, checkpoints: "
            f"{', '.join(ckpts[:4]) or 'none'}{' ...' if len(ckpts) > 4 else ''}); continue it with --resume, "
            "start another run with a new EXPERIMENT.NAME, or replace it with --overwrite"
        )
    return ckpts


def check_resume_config(folder: str, cfg, epochs_done: int, accept_changes: bool = False) -> List[ConfigChange]:
    """Compare ``cfg`` with the run's ``config.yaml`` for ``--resume``; return every changed key.

    The two lists (keys that may change, keys that change the result) are those of
    :mod:`mdistiller_blockkd.utils.runfolder`; ``epochs_done`` is the number of epochs the
    run has done (``SOLVER.EPOCHS`` may not drop below it). Raises :class:`ConfigError` (one
    line listing ``KEY: old -> new``) when a key that changes the result differs and
    ``accept_changes`` is false, and when ``config.yaml`` cannot be read. Reads only.
    """
    import yaml

    path = os.path.join(folder, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            old = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        old = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    if not isinstance(old, dict):
        why = old if isinstance(old, str) else "not a mapping"
        raise ConfigError(
            f"cannot resume: the run's settings '{path}' cannot be read ({why}), so --resume cannot check that the run "
            "continues with them; restore that file, or start afresh with --overwrite"
        )
    changes = resume_changes(old, yaml.safe_load(cfg.dump()), epochs_done)
    blocking = [c for c in changes if c.changes_result]
    if blocking and not accept_changes:
        raise ConfigError(
            f"--resume: {len(blocking)} setting(s) that change the result differ from the run's {path} "
            f"({epochs_done} epoch(s) done): {describe_changes(blocking)}; resume with the run's values, start another "
            "run with a new EXPERIMENT.NAME, or continue with the new values with --resume-with-changes "
            "(recorded in changes.jsonl)"
        )
    return changes


def run_checkpoints(folder: str) -> List[str]:
    """Names of the checkpoint files a run left in ``folder`` (sorted; ``[]`` when there are none)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder)
                  if (n in _CKPT_NAMES or _CKPT_PATTERN.match(n)) and os.path.isfile(os.path.join(folder, n)))


def learning_rate(epoch: int, cfg) -> float:
    """mdistiller's step schedule: ``LR * RATE ** (number of LR_DECAY_STAGES s with epoch > s)``."""
    steps = sum(1 for s in cfg.SOLVER.LR_DECAY_STAGES if epoch > s)
    return float(cfg.SOLVER.LR) * float(cfg.SOLVER.LR_DECAY_RATE) ** steps


def adjust_learning_rate(epoch: int, cfg, optimizer) -> float:
    """Set every parameter group's ``lr`` to :func:`learning_rate` and return it."""
    lr = learning_rate(epoch, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _bf16_note(amp: str, device: torch.device) -> Optional[str]:
    """A warning line when ``SOLVER.AMP`` bf16 runs on a CUDA GPU without native bf16 (before
    Ampere, compute capability < 8.0: torch emulates it, slower than fp16), else ``None``."""
    if amp != "bf16" or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    return (f"SOLVER.AMP bf16 on {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}): this GPU "
            "has no native bf16 and emulates it, slower than fp16; use SOLVER.AMP fp16 on it")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _nonfinite_advice(bad: List[str]) -> str:
    """What to check when the loss terms ``bad`` went non-finite (said from what the terms show)."""
    if bad and all("box" in k for k in bad):  # detection: loss_box_reg, loss_rpn_box_reg
        return (f"only the box regression term{'s' if len(bad) > 1 else ''} ({', '.join(bad)}) went non-finite, the "
                "classification terms did not: check the box annotations (degenerate, huge or non-finite boxes in the "
                "instances files under DATASET.ROOT) and, under SOLVER.AMP fp16, the box deltas' overflow (use bf16 "
                "or off); a SOLVER.LR too high can do it too")
    named = f"{', '.join(bad)} went non-finite" if bad else "the sum went non-finite with finite terms"
    return (f"{named}: lower SOLVER.LR, check the data and the teacher checkpoint, or use SOLVER.AMP off/bf16")


class _StepLog:
    """Per-step loss terms and accuracy counts kept on the device until a check point."""

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: Optional[List[str]] = None
        self.pending: List[tuple] = []
        self.sums: Optional[torch.Tensor] = None  # float64 host: [loss, *terms, correct]
        self.count = 0
        self.last: Dict[str, float] = {}

    def add(self, step: int, n: int, loss, terms: Dict[str, torch.Tensor], correct) -> None:
        keys = list(terms)
        if self.keys is None:
            self.keys = keys
        elif keys != self.keys:
            raise RuntimeError(f"the distiller returned loss terms {keys} after {self.keys} in the same epoch")
        row = torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()] + [correct.float()])
        self.pending.append((step, n, row))

    def flush(self, epoch: int, num_steps: int) -> None:
        """Copy pending rows to the host, check them, add them to the sums (collective when distributed)."""
        host = self.check(epoch, num_steps)
        if host is None:
            return
        weights = torch.tensor([n for _, n, _ in self.pending], dtype=torch.float64)
        weighted = host.clone()
        weighted[:, :-1] *= weights[:, None]  # loss values are batch means; the count is already a sum
        part = weighted.sum(dim=0)
        self.sums = part if self.sums is None else self.sums + part
        self.count += int(weights.sum())
        last = host[-1].tolist()
        self.last = {"loss": last[0], **dict(zip(self.keys, last[1:-1]))}
        self.pending = []

    def check(self, epoch: int, num_steps: int) -> Optional[torch.Tensor]:
        """Raise :class:`TrainingError` if a pending loss is non-finite on any process (collective when
        distributed); return the pending rows on the host (float64), ``None`` when there are none."""
        bad_step, bad_row = 0, None
        host = None
        if self.pending:
            host = torch.stack([r for _, _, r in self.pending]).cpu().double()
            finite = torch.isfinite(host[:, :-1]).all(dim=1)
            if not bool(finite.all()):
                i = int((~finite).nonzero()[0, 0])
                bad_step, bad_row = self.pending[i][0], host[i]
        flag = torch.tensor([bad_step], dtype=torch.int64, device=self.device if du.is_dist() else "cpu")
        flag = du.all_reduce_max(flag)
        if int(flag.item()) or bad_row is not None:
            if bad_row is None:
                raise TrainingError(
                    f"non-finite loss on another process at epoch {epoch}, step {int(flag.item())}/{num_steps}; "
                    "see that process's error"
                )
            values = dict(zip(self.keys, bad_row[1:-1].tolist()))
            terms = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            raise TrainingError(
                f"non-finite loss at epoch {epoch}, step {bad_step}/{num_steps}: loss={_fmt(float(bad_row[0]))} "
                f"({terms}); {_nonfinite_advice([k for k, v in values.items() if not math.isfinite(v)])}"
            )
        return host

    def state(self) -> dict:
        """The running sums and the rows not yet added (kept as rows: a resumed run adds them in the same
        groups, so its float64 sums are those of an uninterrupted run), for a mid-epoch checkpoint."""
        return {"keys": list(self.keys or []), "sums": self.sums, "count": self.count, "last": dict(self.last),
                "pending_steps": [s for s, _, _ in self.pending], "pending_n": [n for _, n, _ in self.pending],
                "pending_rows": torch.stack([r for _, _, r in self.pending]) if self.pending else None}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state`."""
        self.keys = list(state["keys"]) or None
        self.sums, self.count, self.last = state["sums"], int(state["count"]), dict(state["last"])
        rows = state["pending_rows"]
        self.pending = [] if rows is None else [
            (int(s), int(n), r.to(self.device)) for s, n, r in zip(state["pending_steps"], state["pending_n"], rows)]

    def averages(self) -> Dict[str, float]:
        """Mean loss, mean of each term and accuracy (%) so far, summed over every process."""
        k = len(self.keys or [])
        vec = torch.zeros(k + 3, dtype=torch.float64)
        if self.sums is not None:
            vec[: k + 2] = self.sums
        vec[-1] = self.count
        vec = du.all_reduce_sum(vec.to(self.device)).cpu()
        n = max(float(vec[-1]), 1.0)
        out = {"train_loss": float(vec[0]) / n}
        for i, key in enumerate(self.keys or []):
            out[key] = float(vec[1 + i]) / n
        out["train_acc"] = 100.0 * float(vec[k + 1]) / n
        return out


class Trainer:
    """Train ``distiller`` on ``train_loader``, evaluating on ``val_loader`` after every epoch.

    ``experiment_name`` is ``<PROJECT>/<NAME or TAG>`` (see :func:`experiment_name`); the
    run writes under ``LOG.PREFIX/<experiment_name>``. ``dist_info`` (from
    :func:`.dist.init_distributed`) gives the device and rank; without it the device is
    the distiller's and the run has one process. The distiller is moved to the device,
    made channels-last if asked, and wrapped in ``DistributedDataParallel`` when several
    processes train. Call :meth:`train`.
    """

    def __init__(self, experiment_name: str, distiller: nn.Module, train_loader, val_loader, cfg,
                 dist_info: Optional[du.DistInfo] = None, log=None, holdout_loader=None, task=None):
        self.cfg = cfg
        # task hooks for non-classification data (detection: mdistiller_blockkd.detection.task.DetectionTask)
        self.task = task if task is not None else ClassificationTask()
        if dist_info is None:
            param = next(distiller.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            dist_info = du.DistInfo(du.get_rank(), du.get_world_size(), 0, device)
        self.info = dist_info
        self.device = dist_info.device
        self.is_main = dist_info.is_main
        self._print = log or _print_flush
        self.experiment_name = experiment_name
        self.log_path = os.path.join(cfg.LOG.PREFIX, experiment_name)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.holdout_loader = holdout_loader
        self.epochs = int(cfg.SOLVER.EPOCHS)
        self.progress = progress_settings(cfg) if self.is_main else None  # bars on a terminal, lines in a file
        self.tb_freq = max(int(cfg.LOG.TENSORBOARD_FREQ), 0)
        self.save_freq = max(int(cfg.LOG.SAVE_CHECKPOINT_FREQ), 0)
        self.save_every_steps = max(int(cfg.LOG.SAVE_EVERY_STEPS), 0)
        self.check_every = 1 if self.device.type == "cpu" else CUDA_CHECK_EVERY

        amp = resolve_amp(cfg.SOLVER.AMP, self.device)  # the one AMP map (utils.precision)
        self.amp_dtype = AMP_DTYPES[amp]
        self.channels_last = bool(cfg.SOLVER.CHANNELS_LAST)
        deterministic = bool(cfg.EXPERIMENT.DETERMINISTIC)
        if deterministic or self.device.type == "cuda":
            set_deterministic(deterministic)
        note = _bf16_note(amp, self.device)
        if note:
            self.log(note, "WARN")

        n_val = len(val_loader.dataset) if hasattr(val_loader, "dataset") else None
        if n_val is not None and n_val < dist_info.world_size:
            raise ConfigError(
                f"the validation set has {n_val} items, fewer than the {dist_info.world_size} processes; "
                "use fewer processes or a larger DATASET.TEST_SUBSET"
            )

        distiller = distiller.to(self.device)
        if self.channels_last:
            distiller = distiller.to(memory_format=torch.channels_last)
        self.distiller = distiller
        if dist_info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(
                distiller,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(getattr(distiller, "has_unused_parameters", False)),
            )
        else:
            self.model = distiller
        #: the optimizer, its per-update scheduler (None: mdistiller's per-epoch steps) and clipping
        self.optim = build_optimizer(cfg, distiller.get_learnable_parameters(), max(len(train_loader), 1))
        self.optimizer = self.optim.optimizer
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.best_acc = -math.inf  # below every score: Matthews correlations go down to -100
        self.best_val_acc = -math.inf
        self.start_epoch = 1
        self.tb_writer = None
        self.wandb: Optional[WandbRun] = None  # LOG.WANDB: the same scalars as tensorboard (rank 0)
        self.history: List[dict] = []
        self._restored: Optional[dict] = None  # an epoch record taken from 'latest' by resume()
        self._position: Optional[dict] = None  # where a resumed epoch continues ('latest_step'), by resume()
        self._stop = None  # the StopRequest of a stop signal (errors.stop_signals_deferred), while training
        self._lock = FolderLock(self.log_path) if self.is_main else None

    # -- paths and small helpers ---------------------------------------------------------
    def path(self, name: str) -> str:
        """A file of this run's output folder."""
        return os.path.join(self.log_path, name)

    def log(self, msg: str, mode: str = "INFO") -> None:
        """Print on rank 0 (coloured like mdistiller)."""
        if self.is_main:
            self._print(log_msg(msg, mode))

    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _to_device(self, image, target):
        return self.task.to_device(image, target, self.device, self.channels_last)

    def _generators(self) -> Dict[str, torch.Generator]:
        """The data's own generators, saved with each rank's RNG state: the loader's and the augmentation's."""
        gens = {"train_loader": getattr(self.train_loader, "generator", None),
                "augment": getattr(getattr(self.train_loader, "dataset", None), "augment_generator", None)}
        return {k: g for k, g in gens.items() if isinstance(g, torch.Generator)}

    def distiller_state(self) -> Dict[str, torch.Tensor]:
        """The distiller's state dict without the teacher's weights (student, connectors, buffers)."""
        return {k: v for k, v in self.distiller.state_dict().items() if not k.startswith("teacher.")}

    def student_state(self) -> Dict[str, torch.Tensor]:
        """The student's state dict, on the CPU, contiguous (the teacher format's ``model``)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.distiller.student.state_dict().items()}

    # -- start / resume ------------------------------------------------------------------
    def _claim_folder(self, resume: bool, overwrite: bool) -> None:
        """Rank 0 locks the run folder and, for a fresh start, checks it holds no run; every rank
        raises the same :class:`ConfigError` if that fails (so none waits for the others)."""
        problem = None
        if self.is_main:
            try:
                self._lock.acquire()
                left = remove_temporaries(self.log_path)
                if left:
                    self.log(f"removed {len(left)} temporary file(s) a killed process left in {self.log_path}: "
                             f"{', '.join(left[:3])}{' ...' if len(left) > 3 else ''}")
                if not resume:
                    self._check_fresh(overwrite)
            except ConfigError as e:
                problem = str(e)
        problem = du.all_gather_object(problem)[0]
        if problem:
            self._release()
            raise ConfigError(problem)

    def _check_fresh(self, overwrite: bool) -> None:
        ckpts = check_fresh_start(self.log_path, self.epochs, overwrite)
        if not ckpts:
            return
        for name in ckpts:  # the old run's files would mix with the new one's
            os.remove(self.path(name))
        self.log(f"--overwrite: replacing the run in {self.log_path} ({len(ckpts)} checkpoint(s) deleted)")

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _prepare_fresh(self) -> None:
        if not self.is_main:
            return
        os.makedirs(self.log_path, exist_ok=True)
        for name in os.listdir(self.log_path):  # an earlier run's record of resumes with changes
            if name == "changes.jsonl" or _KEPT_CONFIG.match(name):
                os.remove(self.path(name))
        atomic_write_text(self.path("config.yaml"), self.cfg.dump())
        atomic_write_text(self.path(METRICS), "")
        atomic_write_text(self.path("worklog.txt"), f"experiment: {self.experiment_name}\n")

    def resume(self, accept_changes: bool = False) -> None:
        """Restore the training state from ``latest``, or from ``latest_step`` when it holds a position in
        the epoch after ``latest``'s (see the module docstring); ``accept_changes``: continue also when
        settings that change the result differ from the run's ``config.yaml``."""
        latest = self._read_state(self.path("latest"), ("epoch", "model", "optimizer", "best_acc", "rng"))
        step = self._step_state(latest)
        if latest is None and step is None:
            raise CheckpointError(
                f"cannot resume: '{self.path('latest')}' not found; run without --resume to start, or check "
                "LOG.PREFIX and EXPERIMENT.PROJECT / NAME / TAG"
            )
        path = self.path(STEP_CHECKPOINT if step is not None else "latest")
        ckpt = step if step is not None else latest
        done = int(ckpt["epoch"]) - (step is not None)
        problem, changes = None, []
        if self.is_main:
            try:
                changes = check_resume_config(self.log_path, self.cfg, done, accept_changes)
            except ConfigError as e:
                problem = str(e)
        problem = du.all_gather_object(problem)[0]
        if problem:
            raise ConfigError(problem)
        load_distiller_state(self.distiller, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"'{path}': the optimizer state does not fit this distiller's parameters ({e})") from None
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.best_acc = float(ckpt["best_acc"])
        self.best_val_acc = float(ckpt.get("best_val_acc", -math.inf))
        self.start_epoch = done + 1
        states = ckpt["rng"]
        if len(states) != self.info.world_size:
            self.log(f"'{path}' was written by {len(states)} process(es), this run has {self.info.world_size}: "
                     "random streams are restored from rank 0's and will differ from an uninterrupted run", "INFO")
        set_rng_state(states[self.info.rank] if self.info.rank < len(states) else states[0],
                      self.device, self._generators())
        if step is not None:  # train_epoch continues the epoch there
            self._position = {"epoch": done + 1, "step": int(step["step"]), "lr": float(step["lr"]),
                              "rng": states[self.info.rank], **step["position"][self.info.rank]}
        if self.is_main:
            kept = self._records_before(self.start_epoch)
            atomic_write_text(self.path(METRICS), "".join(_json_line(r) + "\n" for r in kept))
            self.history = kept
            note = self._record_changes(done, changes)
            atomic_write_text(self.path("config.yaml"), self.cfg.dump())  # the config the run continues with
            have = {int(r.get("epoch", 0)) for r in kept}
            record = (latest or {}).get("record")
            if done not in have and isinstance(record, dict) and record.get("epoch") == done:
                self._restored = record  # stopped between the epoch's checkpoints and its record: _train writes it
                have.add(done)
            lost = [e for e in range(1, done + 1) if e not in have]
            if lost:
                note += (f"; metrics.jsonl has no record of epoch(s) {', '.join(map(str, lost[:10]))}"
                         f"{' ...' if len(lost) > 10 else ''} and '{path}' holds none to restore: they stay missing")
                self.log(f"warning: {METRICS} has no record of epoch(s) {', '.join(map(str, lost[:10]))}; "
                         "they stay missing from this run's history")
            where = f"at epoch {done + 1} step {step['step']}" if step is not None else f"after epoch {done}"
            append_text(self.path("worklog.txt"), f"resumed from '{path}' {where}{note}\n")
        at = f", epoch {done + 1} at step {step['step']}" if step is not None else ""
        self.log(f"resumed from {path}: epoch {done} done{at}, best_acc {self.best_acc:.2f}")

    @staticmethod
    def _read_state(path: str, need) -> Optional[dict]:
        """The training state at ``path`` (``None`` when there is no such file); :class:`CheckpointError`
        when it lacks one of the keys ``need``."""
        if not os.path.isfile(path):
            return None
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
            raise CheckpointError(f"'{path}' is not a training-state checkpoint (needs {', '.join(need)}); cannot resume "
                                  "from it")
        return ckpt

    def _step_state(self, latest: Optional[dict]) -> Optional[dict]:
        """The mid-epoch checkpoint to resume from: ``latest_step`` when it is in the epoch after ``latest``'s
        (one left behind by ``latest`` -- a kill between an epoch's checkpoints and its removal -- is deleted);
        ``None`` when there is none to use. :class:`CheckpointError` when it was written by another number of
        processes (their positions in the epoch do not carry over)."""
        path = self.path(STEP_CHECKPOINT)
        state = self._read_state(path, ("epoch", "step", "lr", "model", "optimizer", "best_acc", "rng", "position"))
        if state is None:
            return None
        after, epoch, step = int(latest["epoch"]) if latest is not None else 0, int(state["epoch"]), int(state["step"])
        if epoch <= after:
            self.log(f"removing '{path}' (epoch {epoch} step {step}): 'latest' is at epoch {after}, later")
            if self.is_main:
                os.remove(path)
            return None
        if epoch > after + 1 or epoch > self.epochs:
            self.log(f"not resuming from '{path}' (epoch {epoch} step {step}): 'latest' is at epoch {after} and "
                     f"SOLVER.EPOCHS is {self.epochs}; continuing after epoch {after}", "WARN")
            return None
        if len(state["rng"]) != self.info.world_size:
            raise CheckpointError(
                f"'{path}' holds the position of {len(state['rng'])} process(es) in epoch {epoch} (step {step}), this "
                f"run has {self.info.world_size}: resume with {len(state['rng'])} process(es), or delete '{path}' to "
                f"resume after epoch {after}")
        return state

    def _record_changes(self, done: int, changes: List[ConfigChange]) -> str:
        """Record the settings a resumed run changes: a line in ``changes.jsonl`` and the earlier
        epochs' ``config.yaml`` kept as ``config_to_epoch_<done>.yaml``; return a note for the worklog."""
        if not changes:
            return ""
        kept = self.path(f"config_to_epoch_{done}.yaml")  # matches _KEPT_CONFIG
        if not os.path.isfile(kept):  # an earlier resume after the same epoch already kept that epoch's config
            with open(self.path("config.yaml"), encoding="utf-8") as f:
                atomic_write_text(kept, f.read())
        append_json_line(self.path("changes.jsonl"), {
            "from_epoch": done + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changes": [c.record() for c in changes]})
        self.log(f"resuming with changed settings from epoch {done + 1}: {describe_changes(changes)} "
                 f"(recorded in changes.jsonl; the config of epochs 1-{done} is kept in {os.path.basename(kept)})")
        return (f"; settings changed from epoch {done + 1}: {describe_changes(changes)} (epochs 1-{done}: "
                f"{os.path.basename(kept)})")

    def _records_before(self, epoch: int) -> List[dict]:
        """The epoch records of ``metrics.jsonl`` before ``epoch``; a last line cut short by a kill
        is dropped with a warning, a damaged file raises :class:`CheckpointError`."""
        path, notes = self.path("metrics.jsonl"), []
        try:
            records = read_json_lines(path, notes)
            bad = next((r for r in records if type(r.get("epoch")) is not int), None)
            if bad is not None:
                raise ValueError(f"{path}: the record {str(bad)[:80]} has no whole-number 'epoch'")
        except ValueError as e:
            raise CheckpointError(f"cannot resume: {e}; repair or delete that line (records of epochs after "
                                  "'latest' are dropped anyway), or start afresh with --overwrite") from None
        for note in notes:
            self.log(f"warning: {note}")
        return [r for r in records if r["epoch"] < epoch]

    # -- the loop ------------------------------------------------------------------------
    def train(self, resume: bool = False, overwrite: bool = False, accept_changes: bool = False) -> dict:
        """Run epochs ``start..SOLVER.EPOCHS`` (after :meth:`resume` when ``resume``); return a summary.

        A fresh start (``resume`` false) in a folder that holds a run raises
        :class:`ConfigError` unless ``overwrite``; a folder locked by another process
        raises too, and so does a resume whose settings change the result unless
        ``accept_changes`` (see the module docstring). The summary holds ``best_acc``,
        ``last`` (the last epoch's metrics, ``{}`` when no epoch ran) and ``log_path``.
        """
        self._claim_folder(resume, overwrite)
        try:
            with stop_signals_deferred() as self._stop:
                return self._train(resume, accept_changes)
        finally:
            self._stop = None
            self._release()

    def _train(self, resume: bool, accept_changes: bool) -> dict:
        if resume:
            self.resume(accept_changes)
        else:
            self._prepare_fresh()
        steps = len(self.train_loader)
        if self.is_main:
            self.wandb = open_wandb(self.cfg, self.log_path, self.experiment_name.split("/")[-1], resume)
            from tensorboardX import SummaryWriter

            # hide events of an earlier run (fresh start) or of the epoch lost at the kill (resume)
            purge = (self.start_epoch - 1) * steps + (self._position["step"] if self._position else 0) + 1 \
                if resume else 0
            self.tb_writer = SummaryWriter(self.path("train.events"), purge_step=purge)
            self._tb_guard = EventFileGuard(self.tb_writer, self.path("train.events"))
            if self._restored is not None:
                self.log(f"{METRICS} lacked the record of epoch {self._restored['epoch']} (stopped after its "
                         "checkpoints); written from 'latest'")
                self.history.append(self._restored)
                self._write_record(int(self._restored["epoch"]), self._restored, steps)
                self._restored = None
        try:
            for epoch in range(self.start_epoch, self.epochs + 1):
                self.train_epoch(epoch)
                if epoch < self.epochs and self._stop_signal(True):  # came during the evaluation or the saving
                    self._preempted(f"preempted after epoch {epoch} (its checkpoints are written)")
        except BaseException:
            self._close_events(failed=True)
            raise
        self._close_events()
        if self.is_main and self.start_epoch <= self.epochs:
            append_text(self.path("worklog.txt"), f"best_acc\t{self.best_acc:.2f}\n")
        if self.start_epoch > self.epochs:
            self.log(f"nothing to do: '{self.path('latest')}' is at epoch {self.start_epoch - 1} of {self.epochs}")
        self.log(f"best test accuracy {self.best_acc:.2f}; outputs in {self.log_path}")
        return {"best_acc": self.best_acc, "last": self.history[-1] if self.history else {}, "log_path": self.log_path}

    def _close_events(self, failed: bool = False) -> None:
        """Finish the wandb run; close the TensorBoard writer; raise its storage error
        (:class:`EventFileGuard`) unless the run is failing already (that error says more)."""
        writer, self.tb_writer = self.tb_writer, None
        run, self.wandb = self.wandb, None
        if run is not None:
            run.finish(failed)
        if writer is not None:
            writer.close()
            if not failed:
                self._tb_guard.check()

    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch, evaluate, log and checkpoint; return the epoch's metrics record."""
        t_start = time.perf_counter()
        position, self._position = self._position, None
        if position is not None and position["epoch"] == epoch:  # resumed mid-epoch: the optimizer holds its lr
            lr = position["lr"]
        elif self.optim.scheduler is None:  # mdistiller's step schedule, set once per epoch
            lr = adjust_learning_rate(epoch, self.cfg, self.optimizer)
        else:  # per-update schedule: the epoch's first learning rate
            lr = float(self.optimizer.param_groups[0]["lr"])
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        train = self._train_steps(epoch, lr, position)
        t_train = time.perf_counter() - t_start
        steps = max(len(self.train_loader), 1)
        du.broadcast_buffers(self.distiller)
        test = self.evaluate(epoch)
        val = {}
        if self.holdout_loader is not None:
            val = self.task.validate(self, epoch)
            score = val[self.task.val_score_key]
            is_best = score >= self.best_val_acc
            if is_best:
                self.best_val_acc, self.best_acc = score, test[self.task.score_key]
            val["best_val_acc"] = self.best_val_acc
        else:
            score = test[self.task.score_key]
            is_best = score >= self.best_acc
            self.best_acc = max(self.best_acc, score)
        record = {"epoch": epoch, "lr": lr, **train, **test, **val, "best_acc": self.best_acc,
                  "epoch_time_s": time.perf_counter() - t_start, "ms_per_step": 1000.0 * t_train / steps}
        folded = getattr(self.distiller, "teacher_folded", None)
        if folded is not None:  # whether the teacher ran with its BatchNorms folded (Distiller.teacher_model)
            record["teacher_folded"] = folded
        self.history.append(record)
        self._save(epoch, is_best, record)
        if self.is_main:  # after every file of the epoch: a record means they all exist
            self._write_record(epoch, record, steps)
            self._print_epoch(epoch, record)
        return record

    def _train_steps(self, epoch: int, lr: float, position: Optional[dict] = None) -> Dict[str, float]:
        """The epoch's steps (from ``position``'s step on, when resumed mid-epoch); the train metrics."""
        self.model.train()
        steps = len(self.train_loader)
        log = _StepLog(self.device)
        gens = self._generators()
        if position is not None:  # the generators as the epoch began: the same worker seeds and sample order
            for name, state in position["epoch_start"].items():
                if name in gens:
                    gens[name].set_state(state)
        epoch_start = {name: g.get_state() for name, g in gens.items()}  # kept by mid-epoch checkpoints
        batches = iter(self.train_loader)
        first = 1
        if position is not None:
            # the epoch's first batches are read again and dropped: loader workers then draw their augmentation
            # exactly as before (their random streams cannot be saved); then every RNG is set as it was at the step
            for _ in range(position["step"]):
                next(batches)
            set_rng_state(position["rng"], self.device, gens)
            log.load_state(position["log"])
            first = position["step"] + 1
        bar = progress(steps, f"epoch {epoch}/{self.epochs}", self.progress, initial=first - 1)
        try:
            for i in range(first, steps + 1):
                image, target = next(batches)
                image, target = self._to_device(image, target)
                preds, loss, terms = train_step(self.model, self.optim, self.scaler, image, target, epoch,
                                                self._autocast())
                global_step = (epoch - 1) * steps + i
                if self.optim.scheduler is not None:
                    self.optim.scheduler.step_update(global_step)  # the learning rate of the next update
                n, correct = self.task.step_counts(preds, target)
                log.add(i, n, loss, terms, correct)
                tb_step = self.tb_freq > 0 and global_step % self.tb_freq == 0
                if i % self.check_every == 0 or tb_step or i == steps:
                    log.flush(epoch, steps)
                    if tb_step:
                        self._log_scalars({"train/lr": float(self.optimizer.param_groups[0]["lr"]),
                                           **{f"train/{k}": v for k, v in log.last.items()}}, global_step)
                    bar.set_postfix(loss=f"{log.last.get('loss', float('nan')):.3f}", lr=f"{lr:.3g}")
                bar.update(1)
                signum = self._stop_signal(i % self.check_every == 0 or i == steps)
                if signum or (self.save_every_steps and i % self.save_every_steps == 0 and i < steps):
                    self._save_step(epoch, i, steps, lr, log, epoch_start)
                if signum:
                    self._preempted(f"preempted at epoch {epoch} step {i}/{steps} ({signal.Signals(signum).name}); "
                                    f"position saved in '{self.path(STEP_CHECKPOINT)}'")
            log.flush(epoch, steps)
        finally:
            bar.close()
        return log.averages()

    def _stop_signal(self, at_check: bool) -> int:
        """The stop signal this run got (0: none): at every step on one process; with several, at check
        points only (``at_check``), where every process learns whether any got one (one collective), so all
        stop at the same step."""
        signum = (self._stop.signum or 0) if self._stop is not None else 0
        if not self.info.distributed:
            return signum
        if not at_check:
            return 0
        return int(du.all_reduce_max(torch.tensor([signum], dtype=torch.int64, device=self.device)).item())

    def _preempted(self, what: str) -> None:
        """Log and record a stop on a signal, then raise :class:`Preempted` (exit status 75 in a command)
        once rank 0 is done writing (torchrun stops the other processes when one exits)."""
        if self.is_main:
            append_text(self.path("worklog.txt"), f"{what}\n")
        self.log(f"{what}; resume with --resume")
        du.barrier()
        raise Preempted(what)

    @torch.no_grad()
    def evaluate(self, epoch: Optional[int] = None) -> Dict[str, float]:
        """The task's test metrics of this epoch (:meth:`ClassificationTask.evaluate` for images: top-1, top-5,
        loss and each extra head's top-1), exact sums over every process."""
        return self.task.evaluate(self, epoch)

    # -- outputs -------------------------------------------------------------------------
    def _write_record(self, epoch: int, record: dict, steps: int) -> None:
        """The epoch's line in ``metrics.jsonl`` (first), its block in ``worklog.txt``, its tensorboard scalars."""
        append_json_line(self.path(METRICS), record)
        lines = ["-" * 25] + [f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in record.items()]
        append_text(self.path("worklog.txt"), "\n".join(lines) + "\n")
        self._log_scalars({f"epoch/{k}": v for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))},
                          epoch * steps)
        if self.tb_writer is not None:
            self.tb_writer.flush()
            self._tb_guard.check()
        if self.wandb is not None:
            self.wandb.summary(best_acc=self.best_acc)

    def _log_scalars(self, scalars: Dict[str, float], step: int) -> None:
        """The same scalars at the same step to tensorboard and, with ``LOG.WANDB``, to wandb (rank 0)."""
        if self.tb_writer is not None:
            for k, v in scalars.items():
                self.tb_writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step)

    def _print_epoch(self, epoch: int, record: dict) -> None:
        self.log(self.task.summary(record, self.epochs), "EVAL")

    def _save(self, epoch: int, is_best: bool, record: dict) -> None:
        rng = du.all_gather_object(get_rng_state(self.device, self._generators()))
        if not self.is_main:
            return
        # with the epoch's metrics.jsonl record, restored by a resume if the run stopped before writing it
        state = self._train_state(epoch, rng, record=json_safe(record))
        student = {"model": self.student_state()}
        if is_best:
            save_checkpoint(state, self.path("best"))
            save_checkpoint(student, self.path("student_best"))
        if self.save_freq and epoch % self.save_freq == 0:
            save_checkpoint(state, self.path(f"epoch_{epoch}"))
            save_checkpoint(student, self.path(f"student_{epoch}"))
        latest, student_latest, final = final_files(epoch)
        if epoch == self.epochs:
            save_checkpoint(student, self.path(final))
        save_checkpoint(student, self.path(student_latest))
        save_checkpoint(state, self.path(latest))  # last: 'latest' at epoch k => every file of epoch k exists
        if os.path.isfile(self.path(STEP_CHECKPOINT)):  # a position inside this epoch: superseded
            os.remove(self.path(STEP_CHECKPOINT))

    def _save_step(self, epoch: int, step: int, steps: int, lr: float, log: _StepLog, epoch_start: dict) -> None:
        """Write ``latest_step``: the training state after ``step`` of ``epoch`` and each rank's position in
        the epoch (the generators as it began, the train metrics' sums, its RNG). Never a non-finite loss's."""
        log.check(epoch, steps)
        rng = du.all_gather_object(get_rng_state(self.device, self._generators()))
        position = du.all_gather_object({"epoch_start": epoch_start, "log": log.state()})
        if not self.is_main:
            return
        # 'epoch' is the one in progress here ('epoch' of 'latest' is the last one done)
        save_checkpoint(self._train_state(epoch, rng, step=step, steps=steps, lr=lr, position=position),
                        self.path(STEP_CHECKPOINT))

    def _train_state(self, epoch: int, rng, **extra) -> dict:
        """What ``latest`` and ``latest_step`` hold: weights, optimizer, scaler, best scores, every rank's RNG."""
        return {
            "epoch": epoch,
            "model": self.distiller_state(),
            "optimizer": self.optimizer.state_dict(),
            "best_acc": self.best_acc,
            "best_val_acc": self.best_val_acc,
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "world_size": self.info.world_size,
            "distiller": str(self.cfg.DISTILLER.TYPE),
            "student": str(self.cfg.DISTILLER.STUDENT),
            **extra,
        }


def _print_flush(msg: str) -> None:
    print(msg, flush=True)


def _json_line(record: dict) -> str:
    return json.dumps(record, separators=(", ", ": "))
