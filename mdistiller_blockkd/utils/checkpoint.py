"""Checkpoint files: atomic writes, safe reads, clear errors.

Formats
    *Teacher format* (mdistiller / CRD teachers, this toolbox's ``student_*`` files):
    ``{"model": state_dict}`` with plain keys. *Training state* (``latest``, ``best``,
    ``epoch_<n>``): ``{"epoch", "model": distiller state (teacher excluded), "optimizer",
    "best_acc", "scaler", "rng": [per-rank RNG states], "world_size"}``. Everything is a
    tensor, number, string, list or dict, so every file loads with
    ``torch.load(..., weights_only=True)`` -- the only way this toolbox reads checkpoints.
    *Other files* read as weights: a bare state dict, ``{"state_dict": ...}`` (timm's
    training script), ``{"model_state_dict": ...}``, and ``.safetensors`` files.

This is the one checkpoint reader of the toolbox (the trainer's resume, the teacher
loader, the timm wrapper and the commands all read through :func:`load_checkpoint`).

Every failure a user can cause (missing file, corrupt file, weights of another
architecture) raises :class:`~mdistiller_blockkd.errors.CheckpointError` with one line
naming the file and the fix.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .fileio import atomic_write

__all__ = [
    "save_checkpoint",
    "to_cpu",
    "check_checkpoint_file",
    "load_checkpoint",
    "extract_state_dict",
    "read_state_dict",
    "strip_prefixes",
    "load_model_weights",
    "STATE_KEYS",
    "WRAPPER_PREFIXES",
]

#: Keys under which a checkpoint may hold the model's state dict (mdistiller, timm, others).
STATE_KEYS = ("model", "state_dict", "model_state_dict")
#: Key prefixes added by wrappers (DataParallel / DDP ``module.``, ``torch.compile`` ``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_checkpoint(obj, path: str) -> None:
    """Write ``obj`` with ``torch.save`` atomically: temporary file in ``path``'s folder, fsync, ``os.replace``.

    Every tensor is written as a CPU tensor (:func:`to_cpu`): model and optimizer states
    and RNG snapshots taken on a GPU load on any machine, without ``map_location``.
    A process killed while saving leaves the previous file (if any) untouched and no
    temporary file behind (SIGTERM too, in a command: :func:`~mdistiller_blockkd.errors.run_cli`
    turns it into an exception); SIGKILL mid-write leaves a hidden ``.<name>.*.tmp``, which
    the next save of the same name ignores and the trainer deletes when it next starts
    (:func:`~mdistiller_blockkd.utils.fileio.remove_temporaries`).
    """
    obj = to_cpu(obj)

    def write(f) -> None:
        out = _WriteRecorder(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:  # torch's writer turns the file's OSError (a full disk) into a RuntimeError
                raise out.error from None
            raise

    atomic_write(path, write, binary=True)


class _WriteRecorder:
    """A binary file that keeps the ``OSError`` its ``write`` raised (``error``), for :func:`save_checkpoint`."""

    def __init__(self, f):
        self.f = f
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def check_checkpoint_file(path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is an existing file (a folder gets its own words)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint '{path}' is a folder; give a checkpoint file in it (latest, student_best, ...)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' not found; give the path of an existing checkpoint file")


def to_cpu(obj):
    """``obj`` with every tensor in its dicts, lists and tuples replaced by a detached CPU copy
    (CPU tensors are kept as they are); other values are returned unchanged."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)()
        for k, v in obj.items():
            out[k] = to_cpu(v)
        if hasattr(obj, "_metadata"):  # a state dict's module versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def load_checkpoint(path: str, map_location="cpu"):
    """Read a checkpoint with ``torch.load(weights_only=True)`` (a ``.safetensors`` file with safetensors).

    Raises :class:`CheckpointError` naming ``path`` when it is missing, unreadable,
    corrupt, compressed (checked before anything is decompressed: see
    :func:`_check_not_compressed`), or holds Python objects other than tensors and plain
    containers (those are never unpickled).
    """
    path = os.fspath(path)
    check_checkpoint_file(path)
    if path.endswith(".safetensors"):
        return _load_safetensors(path, map_location)
    _check_not_compressed(path)
    try:
        with warnings.catch_warnings():  # torch's note on a foreign pickle protocol; the error below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _REFUSED_OBJECT.search(str(e))
        if not found:
            raise _unreadable(path, e) from None
        what = next(g for g in found.groups() if g)
        raise CheckpointError(
            f"checkpoint '{path}' holds Python objects that are not plain tensors and containers "
            f"({what}); this toolbox loads checkpoints with torch.load(weights_only=True) "
            "and does not unpickle such objects, as unpickling can run any code. To use it, re-save the weights as "
            "a plain state dict where the model was made, e.g. torch.save({'model': model.state_dict()}, 'weights.pth')"
        ) from None
    except OSError:  # unreadable file (permissions, I/O error): named by the OSError itself
        raise
    except Exception as e:  # noqa: BLE001 - corrupt zip, truncated file ...
        raise _unreadable(path, e) from None


#: torch's words (2.4 .. 2.14) for an object ``weights_only=True`` refuses; the group that matched names it
_REFUSED_OBJECT = re.compile(
    r"(?:GLOBAL (\S+) was not an allowed global"  # a class or function outside the allow-list
    r"|unsupported GLOBAL (\S+) whose module"  # a function of a blocked module (os.system ...)
    r"|Unsupported global: GLOBAL (\S+)"
    r"|(?:Can only build|Can only create new object for) .*?but got (<class '[^']+'>|\S+))"
)

#: Leading bytes of compressed formats (a checkpoint is a torch zip archive or a pickle, never one of these).
_COMPRESSED_MAGIC = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"),
                     b"\xfd7zXZ\x00": ("xz", "unxz"), b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"),
                     b"\x04\x22\x4d\x18": ("lz4", "unlz4"), b"7z\xbc\xaf\x27\x1c": ("7z", "7z x")}


def _check_not_compressed(path: str) -> None:
    """Refuse a compressed file, and a zip archive with compressed entries, before anything is inflated.

    ``torch.save`` writes its zip archive with stored (uncompressed) entries; ``torch.load``
    would inflate a deflated entry whole in memory, so a file of 1 MB could take gigabytes.
    Only the first bytes and the zip's central directory are read.
    """
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, (kind, tool) in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise CheckpointError(
                f"checkpoint '{path}' is a {kind}-compressed file, not a torch checkpoint; it is not decompressed "
                f"here: decompress it first ({tool}) and give the file inside")
    if not head.startswith(b"PK\x03\x04"):
        return
    try:
        with zipfile.ZipFile(path) as z:
            packed = [i for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # torch.load names the damage
    if packed:
        raise CheckpointError(
            f"checkpoint '{path}' is a zip archive with compressed entries (e.g. '{packed[0].filename}'), which "
            "torch.save never writes; they are not inflated here (a small file can hold gigabytes): give the "
            "checkpoint as torch.save wrote it (unzip it if it was zipped)")


def _load_safetensors(path: str, map_location) -> Dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - safetensors ships with timm
        raise CheckpointError(f"'{path}' is a safetensors file; install 'safetensors' to read it") from None
    device = map_location if isinstance(map_location, str) else "cpu"
    try:
        return load_file(path, device=device)
    except Exception as e:  # noqa: BLE001 - corrupt header, truncated file ...
        raise _unreadable(path, e) from None


def _unreadable(path: str, e: Exception) -> CheckpointError:
    inner = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))  # torch's wrapper text is about trust, not the cause
    detail = " ".join((inner.group(1) if inner else str(e)).split())[:200]
    return CheckpointError(
        f"cannot read checkpoint '{path}' ({type(e).__name__}: {detail}); the file is corrupt, truncated or "
        "not a torch checkpoint: re-create it or point to another file"
    )


def strip_prefixes(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A copy of ``sd`` whose keys lose their leading ``module.`` prefixes, then their ``_orig_mod.`` ones."""
    out = {}
    for k, v in sd.items():
        for p in WRAPPER_PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def extract_state_dict(obj, path: str = "<checkpoint>", prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """The model state dict inside a loaded checkpoint ``obj``.

    Accepts ``{"model": sd}`` (also ``"state_dict"`` / ``"model_state_dict"``) or a bare
    state dict; removes ``module.`` / ``_orig_mod.`` prefixes. With ``prefix`` (e.g.
    ``"student."``), keys starting with it are selected and the prefix removed when there
    are any -- so a training-state file (``latest``) yields its student.
    """
    sd = obj
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            if isinstance(obj.get(key), dict):
                sd = obj[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        kind = f"keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"checkpoint '{path}' holds no state dict (found {kind}); expected {{'model': state_dict}} or a bare state dict"
        )
    sd = strip_prefixes(sd)
    if prefix:
        picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if picked:
            sd = picked
    return sd


def read_state_dict(path, prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """The model state dict stored in the file ``path`` (:func:`load_checkpoint` then :func:`extract_state_dict`)."""
    path = os.fspath(path)
    return extract_state_dict(load_checkpoint(path), path, prefix)


def _describe_mismatch(model: nn.Module, sd: Dict[str, Tensor]):
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shapes


def load_model_weights(model: nn.Module, path: str, name: Optional[str] = None, prefix: Optional[str] = None) -> None:
    """Load the weights file at ``path`` into ``model`` with ``strict=True``.

    The file holds ``{"model": state_dict}`` (mdistiller teacher format), a bare state
    dict, or (with ``prefix="student."``) a training state. Missing / unexpected keys or
    mis-shaped tensors raise one :class:`CheckpointError` line naming the file, the model
    ``name`` and a few of the offending keys.
    """
    path = os.fspath(path)
    sd = read_state_dict(path, prefix)
    label = f"model '{name}'" if name else f"the {type(model).__name__} model"
    missing, unexpected, shapes = _describe_mismatch(model, sd)
    if missing or unexpected or shapes:
        examples = (missing[:2] + unexpected[:2] + shapes[:2])[:3]
        parts = [f"{len(missing)} missing", f"{len(unexpected)} unexpected keys"]
        if shapes:
            parts.append(f"{len(shapes)} of another shape")
        raise CheckpointError(
            f"checkpoint '{path}' does not fit {label} ({', '.join(parts)}, e.g. {'; '.join(examples)}): "
            "is it a checkpoint of another architecture or number of classes?"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # pragma: no cover - mismatches are caught above
        raise CheckpointError(f"checkpoint '{path}' does not fit {label}: {' '.join(str(e).split())[:300]}") from None


def load_distiller_state(distiller: nn.Module, weights: Dict[str, Tensor], path: str) -> None:
    """Load a training state's ``model`` weights (written from ``path``) into ``distiller``.

    The teacher's weights may be absent (a training state leaves the fixed teacher out);
    any other missing, unexpected or mis-shaped weight raises one :class:`CheckpointError`.
    """
    hint = "was it written with another DISTILLER.TYPE / STUDENT / TEACHER?"
    try:
        missing, unexpected = distiller.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a weight of another shape
        raise CheckpointError(f"'{path}' does not fit this config's distiller ({' '.join(str(e).split())[:200]}); "
                              f"{hint}") from None
    missing = [k for k in missing if not k.startswith("teacher.")]
    if missing or unexpected:
        raise CheckpointError(f"'{path}' does not fit this config's distiller ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected keys, e.g. {', '.join((missing + unexpected)[:3])}); {hint}")
