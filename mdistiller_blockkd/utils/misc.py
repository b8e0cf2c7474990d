"""Small helpers of the training engine.

* :func:`correct_topk` -- how many samples have their target among the top-k logits.
* :func:`seed_everything` -- seed python, numpy and torch (CPU and every CUDA device).
* :func:`set_deterministic` -- deterministic kernels (``EXPERIMENT.DETERMINISTIC``).
* :func:`get_rng_state` / :func:`set_rng_state` -- every random generator's state as a
  plain dict of tensors and numbers, so a checkpoint holding it loads with
  ``torch.load(..., weights_only=True)``.
* :func:`atomic_write_text`, :func:`append_text`, :func:`append_line`,
  :func:`append_json_line` -- files written so that a killed process never leaves a
  half-written file or line (the atomic writes come from :mod:`.fileio`); :func:`json_safe`
  -- a record as plain JSON values.
* :class:`EventFileGuard` -- keeps a storage error of tensorboardX's writing thread for
  the trainer to raise.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .fileio import FILE_MODE, atomic_write, atomic_write_text, fsync_dir, name_os_errors

__all__ = [
    "correct_topk",
    "seed_everything",
    "set_deterministic",
    "CUBLAS_WORKSPACE_CONFIG",
    "get_rng_state",
    "set_rng_state",
    "FILE_MODE",
    "fsync_dir",
    "atomic_write",
    "atomic_write_text",
    "append_text",
    "append_line",
    "append_json_line",
    "json_safe",
    "EventFileGuard",
]


def correct_topk(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> List[torch.Tensor]:
    """Number of samples whose target is among the ``k`` largest logits, for each ``k``.

    Returns 0-d tensors on ``output``'s device (no host synchronisation). ``k`` larger
    than the number of classes counts every sample as correct.
    """
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1, largest=True, sorted=True).indices  # (N, maxk)
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in topk]


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and all CUDA devices)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


#: cuBLAS workspace setting that makes its matrix products deterministic (read when CUDA starts).
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def set_deterministic(deterministic: bool) -> None:
    """Deterministic kernels on (``EXPERIMENT.DETERMINISTIC``) or off.

    On: ``CUBLAS_WORKSPACE_CONFIG`` (unless set; cuBLAS reads it when CUDA starts, so call
    this first), ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an operation
    without a deterministic kernel, such as the CUDA backward of bilinear up-sampling or of
    torchvision's ``roi_align``, runs anyway, and torch warns naming it: from there on a run
    is not bit-exact), cuDNN deterministic and no cuDNN benchmark. Off: torch's defaults,
    with the cuDNN benchmark (the fastest kernels, chosen per process).
    """
    deterministic = bool(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


# -- RNG states as tensors ---------------------------------------------------------------
def get_rng_state(device: Optional[torch.device] = None, generators: Optional[Dict[str, torch.Generator]] = None) -> dict:
    """Snapshot of python, numpy, torch CPU and (when ``device`` is CUDA) that device's RNG.

    ``generators`` adds named ``torch.Generator`` s (a data loader's, ...). Everything is a
    tensor, an int, a float or a string, so ``torch.load(weights_only=True)`` reads it back.
    """
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python_version": int(version),
        "python_state": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": float("nan") if gauss is None else float(gauss),
        "python_has_gauss": gauss is not None,
        "numpy_name": str(np_name),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    for name, gen in (generators or {}).items():
        if gen is not None:
            state[f"gen_{name}"] = gen.get_state()
    return state


def set_rng_state(state: dict, device: Optional[torch.device] = None,
                  generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    """Restore a snapshot taken by :func:`get_rng_state` (missing entries are left alone)."""
    internal = tuple(int(v) for v in state["python_state"].tolist())
    gauss = state["python_gauss"] if state.get("python_has_gauss") else None
    random.setstate((int(state["python_version"]), internal, gauss))
    np.random.set_state((
        state["numpy_name"],
        state["numpy_keys"].numpy().astype(np.uint32),
        int(state["numpy_pos"]),
        int(state["numpy_has_gauss"]),
        float(state["numpy_gauss"]),
    ))
    torch.set_rng_state(state["torch"].cpu())
    if device is not None and torch.device(device).type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.device(device))
    for name, gen in (generators or {}).items():
        key = f"gen_{name}"
        if gen is not None and key in state:
            gen.set_state(state[key].cpu())


# -- files ----------------------------------------------------------------------------
# Atomic writes live in :mod:`.fileio` (torch-free, shared with the command-line tools);
# they are re-exported here for the engine's callers.


def append_text(path: str, text: str) -> None:
    """Append ``text`` to ``path`` with a single ``write`` on an ``O_APPEND`` descriptor, then fsync.

    A killed process leaves either all of ``text`` or none of it (one write of a few
    kilobytes at most; local file systems apply it whole).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with name_os_errors(path):  # a full disk names no file
            written = os.write(fd, data)
            os.fsync(fd)
        if written != len(data):  # pragma: no cover - only on a full disk
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)", path)
    finally:
        os.close(fd)


def append_line(path: str, line: str) -> None:
    """Append one line (``line`` must not contain a newline) with :func:`append_text`."""
    if "\n" in line:
        raise ValueError("append_line writes a single line; the text contains a newline")
    append_text(path, line + "\n")


def json_safe(value):
    """``value`` with plain Python types only: tensors and numpy scalars become numbers or lists,
    NaN becomes ``None`` and infinities +-1e308 (so it is valid JSON and loads ``weights_only``)."""
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float):
        if not math.isfinite(value):
            return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
        return float(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.item() if value.numel() == 1 else value.tolist())
    return value


def append_json_line(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line (:func:`json_safe`: NaN becomes ``null``) with :func:`append_line`."""
    append_line(path, json.dumps(json_safe(record), separators=(", ", ": ")))


class EventFileGuard:
    """Stands between a tensorboardX ``SummaryWriter`` and its events file.

    tensorboardX writes the file in a thread of its own. A storage error there (a full
    disk) would end that thread with a traceback on stderr, and the trainer would then
    block for ever on the writer's full queue. Behind this guard the thread keeps going and
    the first such ``OSError`` is kept; :meth:`check`, called after the trainer's flushes
    and after ``close``, raises it naming ``path``. Later writes are dropped.
    """

    def __init__(self, writer, path: str):
        self.path, self.error = path, None
        events = writer.file_writer.event_writer  # tensorboardX's parts: the file writer, shared with its thread
        self._events = events._ev_writer
        events._ev_writer = events._worker._record_writer = self

    def _call(self, name: str, *args) -> None:
        if self.error is None:
            try:
                getattr(self._events, name)(*args)
            except OSError as e:
                self.error = e

    def write_event(self, event) -> None:
        self._call("write_event", event)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")

    def check(self) -> None:
        """Raise the kept storage error, naming the events file."""
        if self.error is not None:
            raise OSError(self.error.errno, os.strerror(self.error.errno), self.path) from self.error
