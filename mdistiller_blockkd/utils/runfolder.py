"""A run folder: where a run writes (:func:`output_dir`), when it is finished, and which config changes
``--resume`` accepts.

The one place that defines these, for the trainer (which writes run folders) and the
commands that read them (study, report, demo). Imports neither torch nor numpy.

Finished run
    A run of ``SOLVER.EPOCHS`` *N* is finished when ``metrics.jsonl`` holds the record of
    epoch *N* and its final files exist: ``latest``, ``student_latest`` and
    ``ckpt_epoch_<N>.pth`` (:func:`final_files`). The trainer writes an epoch's record
    after every checkpoint of that epoch, so the record of epoch *N* also means that
    ``latest`` is at epoch *N*.

Mid-epoch checkpoint
    ``latest_step`` (:data:`STEP_CHECKPOINT`) holds a run's exact position inside an epoch
    (written on a stop signal and every ``LOG.SAVE_EVERY_STEPS`` steps). It never counts
    as a finished epoch: no record and no final file comes with it. A folder with ``latest``
    or ``latest_step`` holds a run that ``--resume`` continues (:func:`resumable`).

Configuration changes on ``--resume``
    The new configuration is compared with the run's ``config.yaml``, key by key
    (:func:`resume_changes`). A key of :data:`RESUME_FREE_KEYS` (a ``NODE.*`` entry covers
    the node) changes how the run is named, logged or computed, not what it computes, and
    may change. So may ``SOLVER.EPOCHS`` when it is at least the number of epochs done
    (extending a run, or ending it earlier but not before what is done: the step schedule
    counts epochs from 1, so earlier epochs are the same under either). Every other key
    changes the result -- the recipe (``SOLVER.*``), the data (``DATASET.*``), the models
    and teacher (``DISTILLER.*``), every distiller's options (``KD.*``, ``DKD.*``,
    ``LSKD.*``, ``REVIEWKD.*``, ``BLOCKKD.*`` except ``BATCH_STONES``, ``RECOMPUTE`` and ``SAVE_MASKS``), ``DETECTION.*``,
    ``EXPERIMENT.SEED`` -- and needs ``--resume-with-changes``; so does a key that only
    one of the two configurations has (a key added or removed by another version of the
    toolbox, where the old file lacks a key its value counts as the package default).
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Mapping, NamedTuple, Tuple

from .fileio import read_json_lines

__all__ = ["METRICS", "STEP_CHECKPOINT", "experiment_name", "output_dir", "resumable", "final_files", "missing_final_files", "recorded_epoch", "run_finished", "RESUME_FREE_KEYS",
           "ConfigChange", "resume_changes", "describe_changes"]

#: The run's epoch records, one JSON line per finished epoch.
METRICS = "metrics.jsonl"

#: The mid-epoch checkpoint: a run's position inside an epoch (see the module docstring).
STEP_CHECKPOINT = "latest_step"

#: Keys that may change on ``--resume``: they name the folder (``EXPERIMENT.PROJECT / NAME / TAG``,
#: ``LOG.PREFIX``), control logging and checkpoint frequency (``LOG.*``), or compute the same
#: numbers another way (loader workers, evaluation batch, cuDNN determinism, memory layout, the
#: exact BN folding of the teacher, Block-KD's batching of the stones through the teacher and what its
#: stones keep for backward).
RESUME_FREE_KEYS: Tuple[str, ...] = (
    "EXPERIMENT.PROJECT", "EXPERIMENT.NAME", "EXPERIMENT.TAG", "EXPERIMENT.DETERMINISTIC",
    "DATASET.NUM_WORKERS", "DATASET.TEST.BATCH_SIZE", "DATASET.DOWNLOAD",
    "DISTILLER.FOLD_TEACHER_BN", "SOLVER.CHANNELS_LAST", "BLOCKKD.BATCH_STONES", "BLOCKKD.RECOMPUTE",
    "BLOCKKD.SAVE_MASKS", "LOG.*",
)


def experiment_name(cfg) -> str:
    """``<PROJECT>/<NAME or TAG>``, mdistiller's experiment name."""
    name = cfg.EXPERIMENT.NAME or cfg.EXPERIMENT.TAG
    return os.path.join(cfg.EXPERIMENT.PROJECT, name)


def output_dir(cfg) -> str:
    """``LOG.PREFIX/<PROJECT>/<NAME or TAG>``: where a run writes."""
    return os.path.join(cfg.LOG.PREFIX, experiment_name(cfg))


def final_files(epochs: int) -> Tuple[str, ...]:
    """The checkpoint files a finished run of ``epochs`` epochs has (besides its records)."""
    return ("latest", "student_latest", f"ckpt_epoch_{int(epochs)}.pth")


def resumable(folder: str) -> bool:
    """Whether ``folder`` holds a checkpoint ``--resume`` continues from: ``latest`` or :data:`STEP_CHECKPOINT`."""
    return any(os.path.isfile(os.path.join(folder, n)) for n in ("latest", STEP_CHECKPOINT))


def missing_final_files(folder: str, epochs: int) -> List[str]:
    """Names of :func:`final_files` that ``folder`` lacks (``[]`` for a finished run's folder)."""
    return [n for n in final_files(epochs) if not os.path.isfile(os.path.join(folder, n))]


def recorded_epoch(folder: str) -> int:
    """The last epoch with a record in ``folder/metrics.jsonl`` (0 when none; unreadable lines are skipped)."""
    epochs = [r.get("epoch") for r in read_json_lines(os.path.join(folder, METRICS), warnings=[], skip_damaged=True)]
    return int(max((e for e in epochs if isinstance(e, (int, float)) and not isinstance(e, bool)), default=0))


def run_finished(folder: str, epochs: int) -> bool:
    """Whether the run in ``folder`` finished ``epochs`` epochs: the last record and the final files are there."""
    return recorded_epoch(folder) >= int(epochs) and not missing_final_files(folder, epochs)


class ConfigChange(NamedTuple):
    """One key whose value differs between a run's ``config.yaml`` and the configuration it resumes with."""

    key: str
    old: Any
    new: Any
    changes_result: bool

    def describe(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"

    def record(self) -> dict:
        """The change as a JSON object (an absent value is ``null``)."""
        return {"key": self.key, "old": None if self.old is _ABSENT else self.old,
                "new": None if self.new is _ABSENT else self.new, "changes_result": self.changes_result}


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _flatten(node: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".*") and key.startswith(f[:-1])) for f in RESUME_FREE_KEYS)


def resume_changes(old: Mapping, new: Mapping, epochs_done: int) -> List[ConfigChange]:
    """Keys whose values differ between ``old`` (the run's ``config.yaml``) and ``new``, sorted.

    Both are nested mappings (a yacs config or the loaded YAML). A key missing from ``old``
    counts as the package default there. ``changes_result`` follows the module docstring:
    false for :data:`RESUME_FREE_KEYS` and for ``SOLVER.EPOCHS`` ``>= epochs_done`` under
    ``SOLVER.SCHEDULER step`` (a ``linear`` or ``cosine`` schedule depends on the epoch count).
    """
    from ..config import CFG

    defaults = _flatten(CFG)
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        before = a.get(key, defaults.get(key, _ABSENT))
        after = b.get(key, _ABSENT)
        if before == after:
            continue
        free = _free(key)
        if key == "SOLVER.EPOCHS" and isinstance(after, int) and not isinstance(after, bool):
            # extending a run keeps mdistiller's per-epoch steps; a per-update schedule (linear, cosine)
            # spreads its decay over the epochs, so more epochs change every learning rate from the start
            schedule = str(b.get("SOLVER.SCHEDULER", defaults.get("SOLVER.SCHEDULER", "step"))).lower()
            free = after >= int(epochs_done) and schedule == "step"
        changes.append(ConfigChange(key, before, after, not free))
    return changes


def describe_changes(changes: List[ConfigChange]) -> str:
    """``KEY: old -> new, ...`` (values as JSON)."""
    return ", ".join(c.describe() for c in changes)
