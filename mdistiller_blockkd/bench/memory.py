"""Peak memory of a benchmark entry's training steps, measured in isolation.

CPU
    A fresh process per entry (``multiprocessing`` spawn): it primes the libraries with
    one tiny step, builds the entry (models, distiller, optimiser, batch), then records
    the growth of its peak resident set size over its resident size after the build,
    across the warm-up steps. On Linux the peak is reset to the current size through
    ``/proc/self/clear_refs``; elsewhere ``getrusage().ru_maxrss`` (the process's whole
    life) is used. Entries measured in one process would see memory that earlier entries
    freed and the allocator kept, so a figure would depend on the order of the entries.
    The child runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB: every tensor
    is then mapped on allocation and returned to the system when freed, so the resident
    size follows the bytes alive and its peak is the step's peak of live memory (with
    glibc's adaptive threshold, freed tensors stayed in the heap in a pattern that changed
    from run to run: the same entry read up to 70 MiB apart at batch 256).
CUDA
    In the benchmark's process: ``torch.cuda.max_memory_allocated`` above the memory
    allocated after the build, with the peak statistics reset per entry (the caching
    allocator's reserve does not count).

The figure covers what training adds to the built models: activations kept for
backward, gradients, optimiser state, the BN-folded teacher copy.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
from typing import Optional

import torch

__all__ = ["MIB", "PeakMemory", "isolated_peak_mib", "max_batch"]

MIB = 2.0 ** 20
_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"  # glibc (Linux): allocations from this size on are mapped, unmapped on free


def _proc_status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ru_maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


class PeakMemory:
    """Peak memory growth (MiB) of the code run between :meth:`start` and :meth:`stop` in this process."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.reset_ok = False

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.reset_ok = False
        try:  # Linux: reset the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = _proc_status_kib("VmHWM") is not None
        except OSError:
            pass
        rss = _proc_status_kib("VmRSS")
        self.base = rss * 1024 if rss is not None else _ru_maxrss_bytes()

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
        peak = _proc_status_kib("VmHWM") * 1024 if self.reset_ok else _ru_maxrss_bytes()
        return max(0, peak - self.base) / MIB


def _measure_child(entry, options, steps: int, threads: Optional[int], modules, queue) -> None:
    """In a fresh process: build ``entry``, run ``steps`` steps, put ``("ok", MiB)`` or ``("error", text)``."""
    try:
        if threads:
            torch.set_num_threads(threads)
        import importlib

        from ..distillers import distiller_dict
        from .runner import Runner

        for name in modules:  # the module that registers an outside distiller
            importlib.import_module(name)
        if entry.distiller not in distiller_dict:
            raise RuntimeError(f"distiller {entry.distiller} is not registered in a fresh process (it was registered at "
                               "run time by code that is not an importable module); register it in a module or "
                               "plugin, or use --memory off")

        runner = Runner(options)
        runner.prime(entry.amp_dtype, entry.channels_last)
        runner.build(entry)
        mem = PeakMemory(runner.device)
        mem.start()
        for _ in range(max(steps, 1)):
            runner.step(entry)
        queue.put(("ok", mem.stop()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def isolated_peak_mib(entry, options, steps: int = 3, threads: Optional[int] = None, timeout: float = 1800.0) -> float:
    """Peak memory growth (MiB) of ``steps`` training steps of ``entry``, in a fresh process (CPU; see the module docstring).

    ``entry`` is an unbuilt :class:`~.entries.Entry`; ``options`` carries ``device``,
    ``batch_size``, ``num_classes``, ``seed`` and the batch sizes ``image_size`` / ``seq_len``
    (``None`` or absent: the defaults, :func:`~.entries.input_sizes`) as the runner reads them.
    """
    from ..distillers import distiller_dict

    cls = distiller_dict.get(entry.distiller)
    modules = [cls.__module__] if cls is not None and cls.__module__ != "__main__" else []
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure_child, args=(entry, options, steps, threads, modules, queue), daemon=True)
    saved = os.environ.get(_MMAP_THRESHOLD)
    os.environ[_MMAP_THRESHOLD] = str(64 * 1024)  # read by the child's C library when it starts
    try:
        proc.start()
    finally:
        if saved is None:
            del os.environ[_MMAP_THRESHOLD]
        else:
            os.environ[_MMAP_THRESHOLD] = saved
    try:
        status, value = queue.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - queue.Empty or a dead child
        proc.kill()
        raise RuntimeError(f"the memory probe of {entry.name} gave no answer (exit code {proc.exitcode})") from None
    finally:
        proc.join(timeout=60)
    if status != "ok":
        from ..errors import UserError

        raise UserError(f"the memory probe of {entry.name} failed in its fresh process: {value}")
    return float(value)


def max_batch(mib_small: float, batch_small: int, mib_large: float, batch_large: int, budget_mib: float) -> Optional[int]:
    """The largest batch whose peak stays within ``budget_mib``, from two isolated figures (linear in the batch).

    ``None`` when the per-image cost is not positive (the two figures do not grow with the batch).
    """
    per_image = (mib_large - mib_small) / float(batch_large - batch_small)
    if per_image <= 0:
        return None
    fixed = mib_small - per_image * batch_small
    return max(0, int((budget_mib - fixed) // per_image))
