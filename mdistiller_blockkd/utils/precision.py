"""Mixed precision: the one map from ``SOLVER.AMP`` to an autocast dtype.

``SOLVER.AMP`` is ``off`` (fp32), ``bf16``, ``fp16`` (with a grad scaler) or ``auto``:
bf16 where the device computes it natively, fp32 elsewhere. Native means

* CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (Ampere and newer);
* CPU: the ``avx512_bf16`` or ``amx_bf16`` instruction-set flag (Linux ``/proc/cpuinfo``;
  on other systems ``auto`` stays fp32, since native support cannot be read there).

Used by the trainer, the benchmark and the evaluation commands, so a run, its
benchmark entry and its ``config.yaml`` agree on what ``auto`` chose.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

__all__ = ["AMP_CHOICES", "AMP_DTYPES", "amp_dtype", "resolve_amp", "resolve_config_amp", "native_bf16", "precision_name",
           "autocast"]

#: Values ``SOLVER.AMP`` accepts.
AMP_CHOICES = ("off", "bf16", "fp16", "auto")
#: Autocast dtype of each explicit setting (``off``: none).
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device) -> bool:
    """Whether ``device`` computes bf16 natively (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch without the keyword
            return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


def resolve_amp(value, device) -> str:
    """``SOLVER.AMP`` as the explicit setting it means on ``device``: ``off``, ``bf16`` or ``fp16``."""
    value = str(value).strip().lower()
    if value not in AMP_CHOICES:
        from ..errors import ConfigError

        raise ConfigError(f"SOLVER.AMP is '{value}'; use one of {', '.join(AMP_CHOICES)}")
    if value == "auto":
        return "bf16" if native_bf16(device) else "off"
    return value


def resolve_config_amp(cfg, device=None) -> str:
    """Replace ``SOLVER.AMP auto`` in ``cfg`` by the setting it means on ``device``; return that setting.

    ``device`` defaults to the run's device kind (CUDA when visible, else the CPU). Run before
    ``config.yaml`` is written or compared on ``--resume``: the folder records what ran, and a run
    resumed with ``auto`` on a machine that resolves it otherwise is a recipe change, refused like any.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    setting = resolve_amp(cfg.SOLVER.AMP, device)
    if str(cfg.SOLVER.AMP).strip().lower() != setting:
        frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.SOLVER.AMP = setting
        if frozen:
            cfg.freeze()
    return setting


def amp_dtype(value, device) -> Optional[torch.dtype]:
    """The autocast dtype of ``SOLVER.AMP`` = ``value`` on ``device`` (``None``: fp32)."""
    return AMP_DTYPES[resolve_amp(value, device)]


def precision_name(setting: str) -> str:
    """``off`` -> ``fp32``; ``bf16`` / ``fp16`` unchanged (an explicit setting, see :func:`resolve_amp`)."""
    return "fp32" if setting == "off" else setting


def autocast(device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device``'s type with ``dtype``, disabled when ``dtype`` is ``None``."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
